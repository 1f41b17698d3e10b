"""Run third-party conformance suites against real scachefs mounts (``make conformance``).

    .venv/bin/python conformance/run.py [--suites DIR] [--cache DIR] [PART ...]

PARTs (all by default, in this order): ``pjdfstest``, ``fsx``, ``xfstests``.

- pjdfstest: the whole suite (``prove -r``) as root from inside an ``allow_other`` mount.
- fsx (xfstests' ltp/fsx): buffered+mmap and O_DIRECT, with passthrough on and off, on a
  plain file and on a file that is the backing layer of an open qcow2 overlay; then one
  run during which the daemon is SIGKILLed five times (its holder restarts it).
- xfstests: the generic ``quick`` group, FSTYP=fuse FUSE_SUBTYP=.scachefs, test and
  scratch "devices" being directories in a temporary directory.

pjdfstest and xfstests failures are compared with the checked-in expected-failures files
beside this script (``pjdfstest.expected``, ``xfstests.expected``: one failing test per
line with its reason). A failure that is not listed, or a listed test that now passes,
fails the run; fsx must always pass. At the end the driver prints each part's counts and
wall time and, when a list no longer matches, the list's new content (keeping the reasons
of the tests still failing); with CONFORMANCE_UPDATE=1 it rewrites the lists instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
VENV_BIN = CHECKOUT / ".venv" / "bin"
SCACHEFS = VENV_BIN / "scachefs"
NEW_REASON = "NEW: reason not yet written"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- expected failures

def read_expected(path: Path) -> dict[str, str]:
    """``name reason...`` lines (``#`` comments, blank lines ignored) -> {name: reason}."""
    expected: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, reason = line.partition(" ")
            expected[name] = reason.strip()
    return expected


def header_of(path: Path) -> str:
    """The leading comment block of an expected-failures file (kept on rewrite)."""
    lines = []
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            lines.append(line)
    return "\n".join(lines) + "\n" if lines else ""


@dataclass
class Result:
    part: str
    ok: bool = True
    seconds: float = 0.0
    counts: str = ""
    problems: list[str] = field(default_factory=list)
    list_path: Path | None = None
    new_list: str | None = None  # the list's new content when it no longer matches

    def fail(self, msg: str) -> None:
        self.ok = False
        self.problems.append(msg)
        log(f"{self.part}: FAIL: {msg}")


def compare(result: Result, list_path: Path, failing: dict[str, str],
            sort_key: object = None) -> None:
    """Check ``failing`` ({name: detail}) against the list; note the list's new content."""
    expected = read_expected(list_path)
    # A test whose reason starts with "flaky" may fail or pass: it stays listed.
    flaky = {name for name, reason in expected.items() if reason.startswith("flaky")}
    for name in sorted(set(failing) - set(expected)):
        result.fail(f"new failure {name}: {failing[name]}")
    for name in sorted(set(expected) - set(failing) - flaky):
        result.fail(f"listed as failing but passed (or did not run): {name}")
    result.list_path = list_path
    if set(failing) | flaky != set(expected):
        body = "".join(f"{name} {expected.get(name) or NEW_REASON + ' (' + failing[name] + ')'}\n"
                       for name in sorted(set(failing) | flaky,
                                          key=sort_key))  # type: ignore[arg-type]
        result.new_list = header_of(list_path) + body


# ---------------------------------------------------------------- mounts

class ScachefsMount:
    """``scachefs SOURCE MNT -o allow_other,... -f`` (with its holder, restart=on)."""

    def __init__(self, source: Path, mnt: Path, options: list[str], logfile: Path) -> None:
        self.mnt = mnt
        self._log = open(logfile, "ab")
        self.proc = subprocess.Popen(
            [str(SCACHEFS), str(source), str(mnt), "-f", "-o", ",".join(["allow_other", *options])],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self._live():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"scachefs did not come up on {mnt}: see {logfile}")
            time.sleep(0.1)

    def _live(self) -> bool:
        with contextlib.suppress(OSError):
            os.getxattr(self.mnt, "user.scachefs.stats")
            return True
        return False

    def stats(self) -> dict[str, object]:
        return dict(json.loads(os.getxattr(self.mnt, "user.scachefs.stats")))

    def daemon_pid(self) -> int:
        return int(self.stats()["pid"])  # type: ignore[call-overload]

    def unmount(self) -> str | None:
        """Unmount; a problem (the daemon did not exit) as a string."""
        problem = None
        daemon = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            daemon = self.daemon_pid()
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            problem = f"scachefs on {self.mnt} did not exit within 30 s of its unmount"
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["umount", "-l", str(self.mnt)], check=False, capture_output=True)
        if daemon is not None and daemon != self.proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon, 0)
                problem = problem or f"the daemon of {self.mnt} outlived its holder"
                os.kill(daemon, signal.SIGKILL)
        self._log.close()
        return problem


@contextlib.contextmanager
def mounted(source: Path, mnt: Path, options: list[str], logfile: Path,
            result: Result) -> Iterator[ScachefsMount]:
    m = ScachefsMount(source, mnt, options, logfile)
    try:
        yield m
    finally:
        problem = m.unmount()
        if problem:
            result.fail(f"{problem} (log {logfile})")


# ---------------------------------------------------------------- pjdfstest

def run_pjdfstest(pjd: Path, work: Path) -> Result:
    """The full pjdfstest suite as root, from a directory inside an allow_other mount.

    Failing tests are named FILE#N (tests/chmod/00.t#12): prove's summary lists the
    failing numbers of every test file that did not pass."""
    result = Result("pjdfstest")
    src, mnt = work / "pjd.src", work / "pjd.mnt"
    src.mkdir()
    mnt.mkdir()
    out = work / "pjdfstest.log"
    with mounted(src, mnt, ["cache_size=64M"], work / "pjd-scachefs.log", result):
        tdir = mnt / "run"
        tdir.mkdir()
        with open(out, "w") as f:
            subprocess.run(["prove", "-r", str(pjd / "tests")], cwd=tdir, stdout=f,
                           stderr=subprocess.STDOUT, check=False)
    text = out.read_text(errors="replace")
    failing: dict[str, str] = {}
    # Test Summary Report: "/.../tests/chmod/00.t (Wstat: 0 Tests: 119 Failed: 2)"
    # then "  Failed tests:  31, 58-59" (may continue on following lines).
    current = None
    for line in text.splitlines():
        m = re.match(r"^(\S+\.t)\s+\(Wstat: (\d+).*Tests: (\d+) Failed: (\d+)\)", line)
        if m:
            current = m.group(1).split("/tests/", 1)[-1]
            if m.group(4) == "0" and m.group(2) != "0":  # e.g. the script died
                failing[current] = f"Wstat {m.group(2)}"
            continue
        m = re.match(r"^\s+Failed tests?:\s+(.*)$", line)
        if m and current:
            numbers = m.group(1)
            for part in numbers.replace(" ", "").split(","):
                if not part:
                    continue
                lo, _, hi = part.partition("-")
                for n in range(int(lo), int(hi or lo) + 1):
                    failing[f"{current}#{n}"] = "failed"
            continue
        m = re.match(r"^\s+(Parse errors|Non-zero exit status|Non-zero wait status):\s+(.*)$", line)
        if m and current:
            failing.setdefault(current, m.group(1))
            continue
        if line and not line.startswith(" "):
            current = None
    total = re.search(r"Files=(\d+), Tests=(\d+)", text)
    ran = int(total.group(2)) if total else 0
    if not total:
        result.fail(f"prove did not finish: see {out}")
    result.counts = f"{ran} tests in {total.group(1) if total else '?'} files, " \
                    f"{len([k for k in failing if '#' in k])} failed (log {out})"

    def key(name: str) -> tuple[str, int]:
        f, _, n = name.partition("#")
        return (f, int(n) if n else 0)
    compare(result, HERE / "pjdfstest.expected", failing, key)
    return result


# ---------------------------------------------------------------- fsx

def run_fsx(fsx: Path, work: Path) -> Result:
    """fsx must pass every run; no expected failures."""
    result = Result("fsx")
    runs = 0
    ops_total = 0
    buffered = ["-N", "20000"]           # reads, writes, mmap reads/writes, truncates, ...
    # O_DIRECT: page-aligned reads and writes, no mmap (it cannot be direct)
    direct = ["-Z", "-N", "5000", "-R", "-W", "-r", "4096", "-w", "4096", "-t", "4096"]

    def one(name: str, target: Path, args: list[str]) -> bool:
        nonlocal runs, ops_total
        runs += 1
        ops = int(args[args.index("-N") + 1])
        logf = work / f"fsx-{name}.log"
        (work / name).mkdir()  # fsx's own logs (.fsxlog, .fsxops, .fsxgood) of this run
        t0 = time.monotonic()
        with open(logf, "w") as f:
            rc = subprocess.run([str(fsx), *args, "-q", "-P", str(work / name), str(target)],
                                stdout=f, stderr=subprocess.STDOUT, check=False).returncode
        log(f"fsx {name}: exit {rc} in {time.monotonic() - t0:.0f} s")
        if rc != 0:
            result.fail(f"{name}: fsx exited {rc}: {tail(logf)}")
            return False
        ops_total += ops
        return True

    for pt in ("on", "off"):
        src, mnt = work / f"fsx-{pt}.src", work / f"fsx-{pt}.mnt"
        src.mkdir()
        mnt.mkdir()
        with mounted(src, mnt, [f"passthrough={pt}", "cache_size=64M"],
                     work / f"fsx-{pt}-scachefs.log", result) as m:
            for mode, args in (("buffered", buffered), ("odirect", direct)):
                one(f"pt{pt}-plain-{mode}", mnt / f"plain-{mode}", args)
                # A backing layer of an open overlay: B (raw) is named by ov.qcow2, which a
                # qemu-io process holds open through the mount, so B is served as a layer.
                # fsx -k keeps B's 1 MiB of random bytes and size as its starting point.
                # Byte 1 = byte 0: fsx probes copy_file_range by copying byte 0 to byte 1
                # after it has read the file (harmless only on an empty file).
                data = bytearray(os.urandom(1 << 20))
                data[1] = data[0]
                base = mnt / f"layer-{mode}.raw"
                base.write_bytes(data)
                ov = mnt / f"ov-{mode}.qcow2"
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name,
                                "-F", "raw", str(ov)], check=True)
                holder = subprocess.Popen(["qemu-io", "-r", "-c", "sleep 3600000", str(ov)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.STDOUT)
                try:
                    time.sleep(1)
                    if holder.poll() is not None:
                        result.fail(f"qemu-io could not hold {ov} open")
                    if base.name not in layer_paths(m):
                        result.fail(f"{base.name} is not served as a layer")
                    one(f"pt{pt}-layer-{mode}", base, ["-k", *args])
                finally:
                    holder.kill()
                    holder.wait()

    # Five SIGKILLs of the serving daemon during one fsx run (the holder restarts it and
    # the new daemon takes the mount over: fsx must not notice), with passthrough on (the
    # kernel does the I/O, the daemon answers metadata) and off (every read and write
    # goes through the daemon).
    for pt in ("on", "off"):
        name = f"pt{pt}-kill5"
        src, mnt = work / f"{name}.src", work / f"{name}.mnt"
        src.mkdir()
        mnt.mkdir()
        (work / name).mkdir()
        with mounted(src, mnt, [f"passthrough={pt}", "cache_size=64M"],
                     work / f"{name}-scachefs.log", result) as m:
            logf = work / f"fsx-{name}.log"
            ops = 40000
            with open(logf, "w") as f:
                proc = subprocess.Popen([str(fsx), "-N", str(ops), "-q", "-P", str(work / name),
                                         str(mnt / "killed")], stdout=f, stderr=subprocess.STDOUT)
                kills, rc = 0, None
                t0 = time.monotonic()
                try:
                    while kills < 5 and proc.poll() is None:
                        time.sleep(1.0)
                        pid = m.daemon_pid()
                        os.kill(pid, signal.SIGKILL)
                        kills += 1
                        if not wait_new_daemon(m, pid):
                            result.fail(f"{name}: the daemon was not restarted within 30 s")
                            break
                    rc = proc.wait(timeout=1800)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            runs += 1
            log(f"fsx {name}: {kills} daemon kills, exit {rc} in {time.monotonic() - t0:.0f} s")
            if kills < 5:
                result.fail(f"{name}: fsx finished after {kills} kills, before the fifth")
            if rc != 0:
                result.fail(f"{name}: fsx exited {rc}: {tail(logf)}")
            else:
                ops_total += ops
    result.counts = f"{runs} runs, {ops_total} operations passed"
    return result


def wait_new_daemon(m: ScachefsMount, old: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if m.daemon_pid() != old:
                return True
        time.sleep(0.1)
    return False


def layer_paths(m: ScachefsMount) -> list[str]:
    return [str(layer["path"]) for layer in m.stats().get("layers") or []]  # type: ignore[attr-defined]


def tail(path: Path, n: int = 6) -> str:
    return " | ".join(path.read_text(errors="replace").splitlines()[-n:])


# ---------------------------------------------------------------- xfstests

def run_xfstests(xfs: Path, work: Path) -> Result:
    result = Result("xfstests")
    # The test and scratch sources live on a small ext4 of their own (a sparse image on a
    # loop device): xfstests' ENOSPC tests fill the file system under the "device", and
    # on the root file system that starves every other program on the machine.
    store = work / "store"
    store.mkdir()
    image = work / "store.img"
    with open(image, "wb") as f:
        f.truncate(4 << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(store)], check=True)
    try:
        return _run_xfstests(xfs, work, store, result)
    finally:
        for mnt in ("test.mnt", "scratch.mnt"):
            subprocess.run(["umount", str(work / mnt)], check=False, capture_output=True)
        subprocess.run(["umount", str(store)], check=False)
        image.unlink()


def _run_xfstests(xfs: Path, work: Path, store: Path, result: Result) -> Result:
    for d in ("test.mnt", "scratch.mnt", "results"):
        (work / d).mkdir()
    for d in ("test.src", "scratch.src"):
        (store / d).mkdir()
    # Each mount logs to a file: a daemon's stderr would land in the tests' output.
    # (dev,suid would not help: mount(8) drops them before it calls the helper.)
    common = "allow_other,cache_size=256M"
    config = work / "local.config"
    config.write_text(f"""\
export FSTYP=fuse
export FUSE_SUBTYP=.scachefs
export TEST_DEV={store}/test.src
export TEST_DIR={work}/test.mnt
export SCRATCH_DEV={store}/scratch.src
export SCRATCH_MNT={work}/scratch.mnt
export TEST_FS_MOUNT_OPTS="-o {common},log_file={work}/test-scachefs.log"
export MOUNT_OPTIONS="-o {common},log_file={work}/scratch-scachefs.log"
""")
    env = dict(os.environ, HOST_OPTIONS=str(config), RESULT_BASE=str(work / "results"),
               SCACHEFS=str(SCACHEFS))  # mount.fuse.scachefs runs this checkout's scachefs
    out = work / "check.log"
    # XFSTESTS_TESTS="generic/001 generic/103" runs just those (the list then cannot match)
    which = os.environ.get("XFSTESTS_TESTS", "").split() or ["-g", "quick"]
    with open(out, "w") as f:
        subprocess.run(["./check", *which], cwd=xfs, env=env, stdout=f,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
    text = out.read_text(errors="replace")
    ran = notrun = failures = []
    for line in text.splitlines():
        if line.startswith("Ran: "):
            ran = line[5:].split()
        elif line.startswith("Not run: "):
            notrun = line[9:].split()
        elif line.startswith("Failures: "):
            failures = line[10:].split()
    if not ran:
        result.fail(f"./check did not finish: see {out}")
    failing = {}
    for t in failures:
        bad = work / "results" / f"{t}.out.bad"
        failing[t] = "output mismatch" if bad.exists() else "failed"
    # "Ran:" names every test check tried, including those that did not run.
    passed = len(set(ran) - set(failures) - set(notrun))
    result.counts = (f"{passed} passed, {len(failures)} failed, {len(notrun)} not run "
                     f"(log {out}, results {work}/results, not-run reasons "
                     f"{work}/notrun-reasons.txt)")
    # Why tests did not run: one line per reason, with how many tests gave it.
    reasons: dict[str, list[str]] = {}
    for t in notrun:
        f = work / "results" / f"{t}.notrun"
        reason = f.read_text().strip() if f.exists() else "?"
        reasons.setdefault(reason, []).append(t)
    with open(work / "notrun-reasons.txt", "w") as f:
        for reason, tests in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            some = " ".join(tests[:6]) + (" ..." if len(tests) > 6 else "")
            f.write(f"{len(tests):4d}  {reason}  ({some})\n")
    compare(result, HERE / "xfstests.expected", failing)
    return result


# ---------------------------------------------------------------- main

def detach_foreign_fuse_mounts() -> None:
    """Lazily unmount, in our private namespace only, the FUSE mounts it copied.

    Our copies would keep other programs' FUSE superblocks alive after they unmount
    them (their daemons would then never see the end of their connection), and a stat
    of a copy whose daemon hangs hangs too (xfstests runs df, which stats every mount)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype == "fuse" or fstype.startswith(("fuse.", "fuseblk")):
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", default=str(CHECKOUT.parent / "shared" / "suites"))
    ap.add_argument("--cache", default="/var/cache/scachefs-suites")
    ap.add_argument("parts", nargs="*", default=["pjdfstest", "fsx", "xfstests"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("conformance: run as root (the suites need other users and allow_other)")
        return 2
    if not SCACHEFS.exists():
        print(f"conformance: {SCACHEFS} is missing: run `make setup` first")
        return 2
    if not Path("/sbin/mount.fuse.scachefs").exists():
        print("conformance: /sbin/mount.fuse.scachefs is missing: run `make setup` first")
        return 2
    if os.environ.get("SCACHEFS_CONFORMANCE_NS") != "1":
        # Run in a private mount namespace: a mount namespace that some other program
        # creates meanwhile would otherwise copy our mounts and keep their superblocks
        # (and daemons) alive after we unmount them (seen here with debootstrap).
        os.environ["SCACHEFS_CONFORMANCE_NS"] = "1"
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", "--",
                              sys.executable, *sys.argv])
    detach_foreign_fuse_mounts()
    t0 = time.monotonic()
    suites = Path(args.suites).resolve()
    built = subprocess.run([str(HERE / "build.sh"), str(suites), args.cache],
                           stdout=subprocess.PIPE, text=True, check=False)
    if built.returncode != 0:
        return built.returncode
    dirs = dict(line.split("=", 1) for line in built.stdout.split())
    log(f"suites built ({time.monotonic() - t0:.0f} s): {dirs}")
    work = Path(tempfile.mkdtemp(prefix="scachefs-conformance-", dir="/tmp"))
    work.chmod(0o755)  # the suites' other users must reach the mount points inside
    log(f"work directory {work}")
    results = []
    for part in args.parts:
        t = time.monotonic()
        pwork = work / part
        pwork.mkdir()
        log(f"{part}: starting")
        if part == "pjdfstest":
            r = run_pjdfstest(Path(dirs["pjdfstest"]), pwork)
        elif part == "fsx":
            r = run_fsx(Path(dirs["xfstests"]) / "ltp" / "fsx", pwork)
        elif part == "xfstests":
            r = run_xfstests(Path(dirs["xfstests"]), pwork)
        else:
            print(f"conformance: unknown part {part}")
            return 2
        r.seconds = time.monotonic() - t
        log(f"{part}: {'ok' if r.ok else 'FAILED'} in {r.seconds:.0f} s: {r.counts}")
        results.append(r)
    update = os.environ.get("CONFORMANCE_UPDATE") == "1"
    print("\n==== conformance summary")
    for r in results:
        print(f"{r.part:10s} {'ok    ' if r.ok else 'FAILED'} {r.seconds:6.0f} s  {r.counts}")
        for p in r.problems:
            print(f"           - {p}")
    for r in results:
        if r.new_list is None or r.list_path is None:
            continue
        if update:
            r.list_path.write_text(r.new_list)
            print(f"\nrewrote {r.list_path} (CONFORMANCE_UPDATE=1)")
        else:
            print(f"\n---- new content of {r.list_path.relative_to(CHECKOUT)} "
                  f"(or rerun with CONFORMANCE_UPDATE=1):\n{r.new_list}---- end")
    ok = all(r.ok for r in results)
    print(f"\nconformance: {'passed' if ok else 'FAILED'} in {time.monotonic() - t0:.0f} s "
          f"(work directory {work})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
