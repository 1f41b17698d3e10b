#!/usr/bin/env python3
"""The boot-storm benchmark: N VMs boot at once from overlays of one base on a slow store.

    bench/storm                      # full run: nas profile, N = 1 4 16 32 + staggered
    bench/storm --smoke              # N=2 on a tiny synthetic store (what make test runs)
    bench/storm --n 1,16 --modes direct-none,scachefs-prefetch --profile ssd

Workload: the guest-level block requests (offset, length, time) of one real boot
of the Debian test guest (tests/guest.py), recorded once with qemu's
blk_co_preadv/blk_co_pwritev trace events and cached beside the guest image.
Each VM of a storm is a real qcow2 client replaying that boot on its own overlay:
`qemu-io --cache=none` (or buffered) with the requests as commands, so qemu's
qcow2 driver walks the real backing chain. `--vms` boots real TCG guests instead.

Store: an ext4 file system on a loop device (`losetup --direct-io=on`), throttled
with cgroup v1 blkio (`nas`: 50 MiB/s and 200 IOPS; `ssd`: unthrottled) for
whichever processes read it: the replayers in the direct modes, the scachefs
daemon in ours. Page caches are dropped and the daemon restarted before every run.

Writes a table to stdout, JSON to --json (default bench/results/storm.json, the
committed results; with --smoke a new temporary directory, so that a smoke run
never replaces them) and a plot to --plot (default docs/storm.png; not with --smoke).
The bench/storm wrapper runs `make setup` first (Debian packages, .venv).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scachefs import traces  # noqa: E402
from tests import guest  # noqa: E402

MiB = 1 << 20
PROFILES = {"nas": (50 * MiB, 200), "ssd": (0, 0)}
MODES = ("direct-none", "direct-pagecache", "direct-pagecache-warm", "scachefs-cold",
         "scachefs-prefetch", "scachefs-warm")
# One cgroup per run (runs at the same time must not share limits), removed at the end.
CGROUP = Path(f"/sys/fs/cgroup/blkio/scachefs-storm-{os.getpid()}")
LEGACY_CGROUP = Path("/sys/fs/cgroup/blkio/scachefs-storm")  # left by earlier versions
DEFAULT_JSON = REPO / "bench" / "results" / "storm.json"
DEFAULT_MULTIHOST_JSON = REPO / "bench" / "results" / "storm-multihost.json"


def json_path(given: Path | None, smoke: bool, hosts: int) -> Path:
    """Where the results go: --json, else the committed results file of the mode, except
    for a smoke run (a check of the harness, not a measurement): a new temporary
    directory then, never bench/results."""
    if given is not None:
        return given
    if smoke:
        tmp = Path(tempfile.mkdtemp(prefix="scachefs-storm-smoke-"))
        return tmp / ("storm-multihost.json" if hosts else "storm.json")
    return DEFAULT_MULTIHOST_JSON if hosts else DEFAULT_JSON
TRACE_LINE = re.compile(r"@(\d+\.\d+):blk_co_p(read|write)v blk \S+ bs \S+ offset (\d+) "
                        r"bytes (\d+)")


# ------------------------------------------------------------------- workload
@dataclass
class Workload:
    """One boot's block requests: (ms since start, 'r' or 'w', offset, length)."""

    requests: list[tuple[int, str, int, int]]
    virtual_size: int
    source: str

    def script(self, think: bool, seed: int) -> list[str]:
        """qemu-io commands replaying the boot; think time as sleeps if asked."""
        commands = []
        previous = 0
        pattern = 0x10 + seed % 0xE0
        for ms, op, offset, length in self.requests:
            if think and ms > previous:
                commands.append(f"sleep {min(ms - previous, 1000)}")
            previous = ms
            if op == "r":
                commands.append(f"read {offset} {length}")
            else:
                commands.append(f"write -P {pattern} {offset} {length}")
        return commands

    @property
    def think_ms(self) -> int:
        total, previous = 0, 0
        for ms, *_ in self.requests:
            total += min(max(0, ms - previous), 1000)
            previous = ms
        return total


def record_workload(image: guest.GuestImage, out: Path) -> Workload:
    """Boot the guest once with qemu's block trace events on and keep its requests."""
    with tempfile.TemporaryDirectory(prefix="scachefs-workload-") as tmp:
        overlay = Path(tmp) / "vm.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.base), "-F", "qcow2",
           str(overlay))
        log = Path(tmp) / "trace.log"
        result = guest.boot(overlay, image, cache="none", extra_args=[
            "-msg", "timestamp=on", "-trace", "enable=blk_co_preadv",
            "-trace", "enable=blk_co_pwritev", "-D", str(log)])
        if not result.reached_multi_user:
            sys.exit("recording the workload: the guest did not boot")
        requests = []
        start = None
        for line in log.read_text(errors="replace").splitlines():
            m = TRACE_LINE.search(line)
            if not m:
                continue
            t = float(m.group(1))
            start = t if start is None else start
            requests.append((int((t - start) * 1000), m.group(2)[0], int(m.group(3)),
                             int(m.group(4))))
    info = json.loads(sh("qemu-img", "info", "--output=json", str(image.base)))
    workload = Workload(requests, info["virtual-size"], f"boot of {image.base}")
    out.write_text(json.dumps({"requests": requests, "virtual_size": workload.virtual_size,
                               "source": workload.source}))
    return workload


def real_workload() -> tuple[Workload, Path]:
    image = guest.ensure_guest_image()
    path = image.base.parent / "workload.json"
    if path.exists():
        data = json.loads(path.read_text())
        return Workload([tuple(r) for r in data["requests"]], data["virtual_size"],  # type: ignore[misc]
                        data["source"]), image.base
    print("recording the boot workload of the test guest once ...", flush=True)
    return record_workload(image, path), image.base


def smoke_workload(tmp: Path) -> tuple[Workload, Path]:
    """A small synthetic boot on a 64 MiB base, for the smoke run."""
    base = tmp / "smoke-base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M")
    sh("qemu-io", "-c", "write -P 0x5a 0 32M", str(base))
    old = time.time() - 3600  # written long before the storm, as real bases are: scachefs
    os.utime(base, (old, old))  # caches nothing under an identity younger than 2 s
    rng = random.Random(1)
    requests = []
    for i in range(200):
        length = rng.choice([4096, 16384, 65536])
        requests.append((i * 5, "r", rng.randrange(0, 32 * MiB - length, 4096), length))
    requests += [(1000 + i, "w", rng.randrange(32 * MiB, 60 * MiB, 4096), 4096)
                 for i in range(10)]
    return Workload(requests, 64 * MiB, "synthetic smoke boot"), base


# ---------------------------------------------------------------------- store
def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


@dataclass
class Store:
    """An ext4 file system on a direct-I/O loop device: the emulated central store."""

    root: Path
    loop: str
    devno: str  # MAJ:MIN

    def stat(self) -> tuple[int, int]:
        """(read requests, read bytes) the device completed so far."""
        fields = Path(f"/sys/block/{Path(self.loop).name}/stat").read_text().split()
        return int(fields[0]), int(fields[2]) * 512


@contextlib.contextmanager
def loop_store(work: Path, size: int) -> Iterator[Store]:
    image = work / "store.img"
    with open(image, "wb") as f:
        f.truncate(size)
    loop = sh("losetup", "--direct-io=on", "-f", "--show", str(image)).strip()
    root = work / "store"
    root.mkdir()
    try:
        sh("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop)
        sh("mount", loop, str(root))
        st = os.stat(loop)
        yield Store(root, loop, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)


class Throttle:
    """cgroup v1 blkio limits on the store device for the processes that read it."""

    def __init__(self, store: Store, profile: str) -> None:
        CGROUP.mkdir(exist_ok=True)
        bps, iops = PROFILES[profile]
        (CGROUP / "blkio.throttle.read_bps_device").write_text(f"{store.devno} {bps}\n")
        (CGROUP / "blkio.throttle.read_iops_device").write_text(f"{store.devno} {iops}\n")
        self.procs = CGROUP / "cgroup.procs"

    def wrap(self, cmd: list[str]) -> list[str]:
        """A command that joins the cgroup before it execs."""
        return ["sh", "-c", f'echo $$ > {self.procs} && exec "$@"', "sh", *cmd]

    def add(self, pid: int) -> None:
        self.procs.write_text(f"{pid}\n")


def remove_cgroup() -> None:
    """Remove the run's blkio cgroup (moving anything left in it back to the root)."""
    with contextlib.suppress(OSError):
        LEGACY_CGROUP.rmdir()  # only if empty: never touches a process
    if not CGROUP.exists():
        return
    root = CGROUP.parent / "cgroup.procs"
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError):
            for pid in (CGROUP / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # gone meanwhile
                    root.write_text(f"{pid}\n")
        try:
            CGROUP.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                print(f"cannot remove {CGROUP}: {exc}", file=sys.stderr)
                return
            time.sleep(0.1)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# ---------------------------------------------------------------------- daemon
class Daemon:
    """scachefs in the foreground, in the throttled cgroup."""

    def __init__(self, store: Store, mnt: Path, throttle: Throttle, options: str,
                 log: Path) -> None:
        self.mnt = mnt
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            throttle.wrap([sys.executable, "-m", "scachefs", str(store.root), str(mnt), "-f",
                           "-o", options]), stdout=self._log, stderr=subprocess.STDOUT,
            cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if json.loads(os.getxattr(mnt, "user.scachefs.stats"))["schema"] == 1:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        sys.exit(f"scachefs did not start; see {log}")

    def stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(os.getxattr(self.mnt, "user.scachefs.stats"))
        return doc

    def layer(self, path: str) -> dict[str, Any]:
        for layer in self.stats()["layers"]:
            if layer["path"] == path:
                return dict(layer)
        return {}

    def rss(self) -> int:
        """The serving daemon's RSS (not the holder's: it only keeps the mount)."""
        if not getattr(self, "_daemon_pid", None):
            self._daemon_pid = int(self.stats()["pid"])
        for line in Path(f"/proc/{self._daemon_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False, capture_output=True)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], check=False)
        self._log.close()


def wait_prefetch(daemon: Daemon, path: str, timeout: float = 600) -> dict[str, Any]:
    start = time.monotonic()
    while time.monotonic() < start + timeout:
        layer = daemon.layer(path)
        if layer.get("prefetch") and not layer["prefetch"]["running"]:
            return layer
        if not layer.get("prefetch") and time.monotonic() > start + 10:
            sys.exit(f"no prefetch of {path} started; layer stats: {layer}")
        time.sleep(0.05)
    sys.exit(f"the prefetch of {path} did not finish in {timeout} s")


# ----------------------------------------------------------------------- runs
@dataclass
class Run:
    mode: str
    n: int
    stagger: float
    think: bool
    vm_seconds: list[float] = field(default_factory=list)
    makespan: float = 0.0
    store_reads: int = 0
    store_bytes: int = 0
    warm_seconds: float = 0.0
    daemon_peak_rss: int | None = None
    daemon_cached: int | None = None
    useful_ratio: float | None = None
    think_seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        vm = sorted(self.vm_seconds)
        p95 = vm[min(len(vm) - 1, round(0.95 * (len(vm) - 1)))]
        out = {"mode": self.mode, "n": self.n, "stagger_s": self.stagger, "think": self.think,
               "makespan_s": round(self.makespan, 3),
               "vm_p50_s": round(statistics.median(vm), 3), "vm_p95_s": round(p95, 3),
               "vm_max_s": round(vm[-1], 3), "store_reads": self.store_reads,
               "store_bytes": self.store_bytes,
               "store_bytes_per_vm": self.store_bytes // max(1, self.n),
               "warm_s": round(self.warm_seconds, 3), "useful_prefetch": self.useful_ratio,
               "daemon_peak_rss": self.daemon_peak_rss, "daemon_cached": self.daemon_cached}
        if self.think:
            out["stall_p50_s"] = round(statistics.median(vm) - self.think_seconds, 3)
        if self.daemon_peak_rss is not None and self.daemon_cached is not None:
            out["rss_minus_cached_mib"] = round(
                (self.daemon_peak_rss - self.daemon_cached) / MiB, 1)
        return out


class Bench:
    def __init__(self, store: Store, work: Path, workload: Workload, profile: str,
                 log: Path, chunk_size: str) -> None:
        self.chunk_size = chunk_size
        self.store = store
        self.work = work
        self.workload = workload
        self.throttle = Throttle(store, profile)
        self.mnt = work / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.log = log
        self.working_set: traces.WorkingSet | None = None

    def record_trace(self) -> None:
        """Record the boot once through scachefs (unthrottled) so prefetch has a trace."""
        daemon = Daemon(self.store, self.mnt, self.throttle,
                        f"record=on,prefetch=off,chunk_size={self.chunk_size}", self.log)
        try:
            self._overlays(1, "rec")
            self._replay(self.mnt / "rec0.qcow2", cache="none", think=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                trace = daemon.layer("base.qcow2").get("trace") or {}
                if trace.get("status") == "ready" and not trace.get("recording"):
                    break
                time.sleep(0.1)
        finally:
            daemon.stop()
        files = list((self.store.root / ".scache" / "traces").iterdir())
        decoded = [traces.decode(f.read_bytes()) for f in files]
        self.working_set = traces.merge(decoded, decoded[0].layer, decoded[0].chunk_size)

    def _overlays(self, n: int, prefix: str = "vm") -> None:
        for i in range(n):
            path = self.store.root / f"{prefix}{i}.qcow2"
            path.unlink(missing_ok=True)
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
               str(path))

    def _replay_cmd(self, image: Path, cache: str, think: bool, seed: int) -> list[str]:
        cmd = ["qemu-io", f"--cache={cache}"]
        for command in self.workload.script(think, seed):
            cmd += ["-c", command]
        return [*cmd, str(image)]

    def _replay(self, image: Path, cache: str, think: bool) -> None:
        subprocess.run(self._replay_cmd(image, cache, think, 0), check=True,
                       capture_output=True)

    def warm_page_cache(self) -> None:
        """The zero-code baseline: read the trace's extents of the base beforehand."""
        assert self.working_set is not None
        runs = traces.plan_runs(self.working_set.chunks, self.working_set.chunk_size,
                                (self.store.root / "base.qcow2").stat().st_size)
        script = ("import os,sys\nfd=os.open(sys.argv[1],os.O_RDONLY)\n"
                  "for a in sys.argv[2:]:\n o,n=map(int,a.split(':'));os.pread(fd,n,o)\n")
        args = [f"{o}:{n}" for o, n, _ in runs]
        subprocess.run(self.throttle.wrap([sys.executable, "-c", script,
                                           str(self.store.root / "base.qcow2"), *args]),
                       check=True)

    def run(self, mode: str, n: int, stagger: float = 0.0, think: bool = False) -> Run:
        result = Run(mode, n, stagger, think, think_seconds=self.workload.think_ms / 1000)
        self._overlays(n)
        drop_caches()
        daemon = None
        via_mount = mode.startswith("scachefs")
        if via_mount:
            options = {"scachefs-cold": "record=off,prefetch=off",
                       "scachefs-prefetch": "record=off,prefetch=open",
                       "scachefs-warm": "record=off,prefetch=open"}[mode]
            daemon = Daemon(self.store, self.mnt, self.throttle,
                            f"{options},cache_size=2G,allow_other,chunk_size={self.chunk_size}",
                            self.log)
        root = self.mnt if via_mount else self.store.root
        cache = "writeback" if mode.startswith("direct-pagecache") else "none"
        if mode == "direct-pagecache-warm":
            start = time.monotonic()
            self.warm_page_cache()
            result.warm_seconds = time.monotonic() - start
        if mode == "scachefs-warm" and daemon is not None:
            start = time.monotonic()
            os.setxattr(self.mnt, "user.scachefs.command",
                        b'{"action": "warm", "path": "base.qcow2"}')
            time.sleep(0.05)
            wait_prefetch(daemon, "base.qcow2")
            result.warm_seconds = time.monotonic() - start
        before = self.store.stat()
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set() and daemon is not None:
                with contextlib.suppress(OSError, ValueError):
                    peak[0] = max(peak[0], daemon.rss())
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        wrap = (lambda c: c) if via_mount else self.throttle.wrap
        t0 = time.monotonic()
        waiters = []
        ends: list[float] = []
        errors: list[str] = []

        def wait(started: float, proc: subprocess.Popen[bytes]) -> None:
            _, err = proc.communicate()  # each VM's end is seen when it happens
            end = time.monotonic()
            if proc.returncode != 0:
                errors.append(err.decode(errors="replace")[-500:])
            ends.append(end)
            result.vm_seconds.append(end - started)

        for i in range(n):
            if stagger:
                delay = t0 + i * stagger - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            proc = subprocess.Popen(
                wrap(self._replay_cmd(root / f"vm{i}.qcow2", cache, think, i)),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            waiter = threading.Thread(target=wait, args=(time.monotonic(), proc))
            waiter.start()
            waiters.append(waiter)
        for waiter in waiters:
            waiter.join()
        if errors:
            sys.exit(f"{mode}: a replay failed: {errors[0]}")
        result.makespan = max(ends) - t0
        done.set()
        after = self.store.stat()
        result.store_reads = after[0] - before[0]
        result.store_bytes = after[1] - before[1]
        if daemon is not None:
            stats = daemon.stats()
            layer = daemon.layer("base.qcow2")
            result.daemon_peak_rss = peak[0]
            result.daemon_cached = stats["cache"]["used_bytes"]
            if layer.get("prefetch"):
                result.useful_ratio = layer["prefetch"]["useful_ratio"]
            daemon.stop()
        return result


    def run_vms(self, mode: str, n: int, memory_mib: int,
                image: guest.GuestImage) -> dict[str, Any]:
        """N real TCG guests booting at once to multi-user (slow but real)."""
        self._overlays(n)
        drop_caches()
        via_mount = mode.startswith("scachefs")
        daemon = None
        if via_mount:
            daemon = Daemon(self.store, self.mnt, self.throttle,
                            f"record=off,prefetch=open,cache_size=2G,allow_other,"
                            f"chunk_size={self.chunk_size}", self.log)
        else:  # the guests themselves read the store: put them in the throttled cgroup
            self.throttle.add(os.getpid())
        root = self.mnt if via_mount else self.store.root
        cache = "none" if mode == "direct-none" or via_mount else "writeback"
        before = self.store.stat()
        results: list[guest.BootResult | None] = [None] * n
        peak = [0]
        done = threading.Event()

        def boot_one(i: int) -> None:
            results[i] = guest.boot(root / f"vm{i}.qcow2", image, memory_mib=memory_mib,
                                    cache=cache, timeout=900)

        def sample() -> None:
            while not done.is_set() and daemon is not None:
                with contextlib.suppress(OSError, ValueError):
                    peak[0] = max(peak[0], daemon.rss())
                time.sleep(0.2)

        threads = [threading.Thread(target=boot_one, args=(i,)) for i in range(n)]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        makespan = time.monotonic() - t0
        done.set()
        if not via_mount:
            Path("/sys/fs/cgroup/blkio/cgroup.procs").write_text(f"{os.getpid()}\n")
        after = self.store.stat()
        row: dict[str, Any] = {
            "mode": mode, "n": n, "memory_mib": memory_mib, "makespan_s": round(makespan, 2),
            "vm_seconds": [round(r.seconds, 2) if r else None for r in results],
            "all_reached_multi_user": all(r is not None and r.reached_multi_user
                                          for r in results),
            "store_reads": after[0] - before[0], "store_bytes": after[1] - before[1]}
        if daemon is not None:
            cached = daemon.stats()["cache"]["used_bytes"]
            row.update(daemon_peak_rss=peak[0], daemon_cached=cached,
                       rss_minus_cached_mib=round((peak[0] - cached) / MiB, 1))
            daemon.stop()
        return row


# ------------------------------------------------------------------ multi-host
@dataclass
class HostRun:
    """One host's storm in the multi-host mode."""

    phase: str
    host: str
    vms: int
    makespan: float = 0.0
    wire_bytes: int = 0  # what the store host sent to this host (its veth)
    daemon_store_bytes: int | None = None  # what scachefs read through its network mount
    daemon_store_reads: int | None = None  # in how many requests
    prefetch_s: float | None = None  # how long the prefetch of the working set took
    prefetched: bool | None = None
    recorded: bool | None = None

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"makespan_s": round(self.makespan, 3)}


class MultiHost:
    """H compute hosts (network namespaces) mounting the store over sshfs from a store host.

    The store host's sshd (and so every sftp-server it forks) reads the loop device in
    the throttled cgroup; each host runs scachefs over its sshfs mount.
    """

    def __init__(self, bench: Bench, hosts: int, vms: int) -> None:
        from tests import netns

        self.netns = netns
        self.bench = bench
        self.vms = vms
        self.work = bench.work / "multihost"
        self.work.mkdir()
        self.net = netns.Network("storm")
        try:
            self.ssh = netns.SshStore(self.net, bench.store.root, self.work / "ssh")
            bench.throttle.add(self.ssh.proc.pid)  # sftp-servers are forked later: inherit
            self.hosts = []
            for i in range(hosts):
                host = self.net.add_host(f"h{i + 1}")
                self.ssh.mount(host, self.work / host.name / "store")
                (self.work / host.name / "mnt").mkdir()
                self.hosts.append(host)
        except BaseException:
            self.close()
            raise

    def net_mnt(self, host: Any) -> Path:
        return self.work / host.name / "store"

    def mnt(self, host: Any) -> Path:
        return self.work / host.name / "mnt"

    def close(self) -> None:
        for host in getattr(self, "hosts", []):
            self.ssh.unmount(host, self.net_mnt(host))
        if hasattr(self, "ssh"):
            self.ssh.close()
        self.net.close()

    def storm(self, phase: str, hosts: list[Any], options: str | None) -> list[HostRun]:
        """M VMs on each of ``hosts`` at once; scachefs with ``options``, or none (None)."""
        drop_caches()
        runs = {h.name: HostRun(phase, h.name, self.vms) for h in hosts}
        daemons: dict[str, Any] = {}
        roots = {}
        try:
            for host in hosts:
                for i in range(self.vms):  # on the network mount: no scachefs open yet
                    name = f"{host.name}-vm{i}.qcow2"
                    # through the host's own mount: sshfs caches what it has seen
                    host.run("rm", "-f", self.net_mnt(host) / name)
                    host.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2",
                             "-F", "qcow2", self.net_mnt(host) / name)
            # Everything the daemon reads counts: its scan, fingerprint, prefetch, misses.
            before = {h.name: self.net.sent_to(h) for h in hosts}
            for host in hosts:
                if options is None:
                    roots[host.name] = self.net_mnt(host)
                else:
                    daemons[host.name] = self.netns.NsMount(
                        host, self.net_mnt(host), self.mnt(host),
                        [f"host_id={host.name}", "allow_other", "cache_size=2G",
                         f"chunk_size={self.bench.chunk_size}", *options.split(",")],
                        self.work / f"scachefs-{phase}-{host.name}.log")
                    roots[host.name] = self.mnt(host)
            if options is not None and "prefetch=mount" in options:
                for host in hosts:  # warm before the storm, as a scheduler would
                    wait_ns_prefetch(daemons[host.name])
            procs = []
            t0 = time.monotonic()
            for host in hosts:
                for i in range(self.vms):
                    cmd = self.bench._replay_cmd(roots[host.name] / f"{host.name}-vm{i}.qcow2",
                                                 "none", False, i)
                    procs.append((host.name, host.popen(*cmd, stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.PIPE)))
            for name, proc in procs:
                _, err = proc.communicate()
                if proc.returncode != 0:
                    sys.exit(f"{phase}: a replay on {name} failed: {err.decode()[-500:]}")
                runs[name].makespan = time.monotonic() - t0
            for host in hosts:
                daemon = daemons.get(host.name)
                if daemon is not None:
                    layer = wait_ns_trace(daemon)
                    runs[host.name].daemon_store_bytes = layer["store_bytes"]
                    runs[host.name].daemon_store_reads = layer["store_reads"]
                    if layer.get("prefetch"):
                        runs[host.name].prefetch_s = layer["prefetch"]["seconds"]
                    runs[host.name].prefetched = bool(layer.get("prefetch"))
                    runs[host.name].recorded = (layer["trace"]["status"] == "ready"
                                                and options is not None
                                                and "record=off" not in options
                                                and not layer.get("prefetch"))
                runs[host.name].wire_bytes = self.net.sent_to(host) - before[host.name]
        finally:
            for daemon in daemons.values():
                daemon.unmount()
        return list(runs.values())


def wait_ns_prefetch(daemon: Any, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        layer: dict[str, Any] = next((la for la in daemon.stats()["layers"]
                                      if la["path"] == "base.qcow2"), {})
        if layer.get("prefetch") and not layer["prefetch"]["running"]:
            return layer
        time.sleep(0.1)
    sys.exit("the prefetch did not finish")


def wait_ns_trace(daemon: Any, timeout: float = 60) -> dict[str, Any]:
    """The base's stats once no boot is being recorded and no prefetch runs."""
    deadline = time.monotonic() + timeout
    while True:
        layer: dict[str, Any] = next((la for la in daemon.stats()["layers"]
                                      if la["path"] == "base.qcow2"), {})
        trace = layer.get("trace") or {}
        busy = (trace.get("recording") or trace.get("status") == "recording"  # saving
                or (layer.get("prefetch") or {}).get("running"))
        if not busy or time.monotonic() > deadline:
            return layer
        time.sleep(0.1)


def run_multihost(bench: Bench, hosts: int, vms: int) -> dict[str, Any]:
    """Store bytes per host for H hosts x M VMs, and the second host's first storm."""
    mh = MultiHost(bench, hosts, vms)
    rows: list[HostRun] = []
    try:
        first, second = mh.hosts[0], mh.hosts[1]
        traces_dir = bench.store.root / ".scache" / "traces"
        shutil.rmtree(traces_dir, ignore_errors=True)  # the single-host recording: not ours

        def phase(name: str, hosts_: list[Any], options: str | None) -> list[HostRun]:
            print(f"  multi-host {name} ...", end="", flush=True)
            out = mh.storm(name, hosts_, options)
            rows.extend(out)
            print(" " + ", ".join(f"{r.host} {r.makespan:.2f} s {r.wire_bytes / MiB:.1f} MiB"
                                  for r in out), flush=True)
            return out

        phase("direct-sshfs", [first], None)  # no scachefs: every VM reads the store
        phase("first-host-cold", [first], "record=auto,prefetch=open")
        phase("second-host-no-trace", [second], "record=off,prefetch=off")
        phase("second-host-trace", [second], "record=off,prefetch=open")
        phase("other-hosts-trace", mh.hosts[1:], "record=off,prefetch=open")
    finally:
        mh.close()
    by = {(r.phase, r.host): r for r in rows}
    cold = by[("first-host-cold", first.name)]
    scale = [cold, *(r for r in rows if r.phase == "other-hosts-trace")]
    direct = by[("direct-sshfs", first.name)]
    return {"hosts": hosts, "vms_per_host": vms, "rows": [r.row() for r in rows],
            "scale_out": {"per_host_wire_bytes": {r.host: r.wire_bytes for r in scale},
                          "total_wire_bytes": sum(r.wire_bytes for r in scale),
                          "direct_one_host_wire_bytes": direct.wire_bytes},
            "second_host_first_storm": {
                "with_trace_s": round(by[("second-host-trace", second.name)].makespan, 3),
                "without_trace_s": round(by[("second-host-no-trace", second.name)].makespan,
                                         3),
                "with_trace_wire_bytes": by[("second-host-trace", second.name)].wire_bytes,
                "without_trace_wire_bytes":
                    by[("second-host-no-trace", second.name)].wire_bytes}}


def multihost_table(doc: dict[str, Any], unique: int) -> str:
    lines = [f"{'phase':<22}{'host':>5}{'VMs':>5}{'makespan':>10}{'wire MiB':>10}"
             f"{'x ws':>7}{'daemon MiB':>12}{'reqs':>6}{'prefetch s':>11}"]
    for r in doc["rows"]:
        daemon = "-" if r["daemon_store_bytes"] is None else \
            f"{r['daemon_store_bytes'] / MiB:.1f}"
        reqs = "-" if r["daemon_store_reads"] is None else str(r["daemon_store_reads"])
        pf = "-" if r["prefetch_s"] is None else f"{r['prefetch_s']:.2f}"
        lines.append(f"{r['phase']:<22}{r['host']:>5}{r['vms']:>5}{r['makespan_s']:>10.2f}"
                     f"{r['wire_bytes'] / MiB:>10.1f}{r['wire_bytes'] / unique:>7.2f}"
                     f"{daemon:>12}{reqs:>6}{pf:>11}")
    so = doc["scale_out"]
    h, m = doc["hosts"], doc["vms_per_host"]
    lines.append(f"\n{h} hosts x {m} VMs: {so['total_wire_bytes'] / MiB:.1f} MiB over the wire "
                 f"= {so['total_wire_bytes'] / unique:.2f}x the working set "
                 f"(H = {h}; without scachefs ~{h * so['direct_one_host_wire_bytes'] / MiB:.0f} "
                 f"MiB, {h * so['direct_one_host_wire_bytes'] / unique:.1f}x)")
    sh2 = doc["second_host_first_storm"]
    lines.append(f"second host's first storm: {sh2['with_trace_s']:.2f} s with the first "
                 f"host's trace, {sh2['without_trace_s']:.2f} s without")
    return "\n".join(lines)


# --------------------------------------------------------------------- report
def table(rows: list[dict[str, Any]], floor: float | None) -> str:
    by_key = {(r["mode"], r["n"], r["stagger_s"]): r for r in rows}
    lines = [f"{'mode':<22}{'N':>4}{'stag':>5}{'makespan':>10}{'p50':>7}{'p95':>7}{'max':>7}"
             f"{'store MiB':>10}{'reqs':>7}{'MiB/VM':>8}{'warm':>6}{'useful':>7}"
             f"{'rss-c':>7}{'vs none':>8}{'vs pc':>7}"]
    for r in rows:
        none = by_key.get(("direct-none", r["n"], r["stagger_s"]))
        pc = by_key.get(("direct-pagecache", r["n"], r["stagger_s"]))
        useful = "-" if r["useful_prefetch"] is None else f"{r['useful_prefetch']:.2f}"
        rss = "-" if r.get("rss_minus_cached_mib") is None else f"{r['rss_minus_cached_mib']:.0f}"
        lines.append(
            f"{r['mode']:<22}{r['n']:>4}{r['stagger_s']:>5.1f}{r['makespan_s']:>10.2f}"
            f"{r['vm_p50_s']:>7.2f}{r['vm_p95_s']:>7.2f}{r['vm_max_s']:>7.2f}"
            f"{r['store_bytes'] / MiB:>10.1f}{r['store_reads']:>7}"
            f"{r['store_bytes_per_vm'] / MiB:>8.1f}{r['warm_s']:>6.2f}{useful:>7}{rss:>7}"
            f"{(r['makespan_s'] / none['makespan_s']) if none else float('nan'):>8.2f}"
            f"{(r['makespan_s'] / pc['makespan_s']) if pc else float('nan'):>7.2f}")
    if floor is not None:
        lines.append(f"\nphysical floor (unique working set / bandwidth or extents / IOPS): "
                     f"{floor:.2f} s")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], ws_bytes: int, floor: float | None) -> list[str]:
    """The issue's targets at N=16 (nas, no think time), met or MISSED."""
    out = []
    get = {(r["mode"], r["n"]): r for r in rows if r["stagger_s"] == 0 and not r["think"]}
    n = 16 if ("scachefs-prefetch", 16) in get else max((k[1] for k in get), default=0)
    pre, none, pc = (get.get((m, n)) for m in ("scachefs-prefetch", "direct-none",
                                               "direct-pagecache"))
    if pre:
        ratio = pre["store_bytes"] / ws_bytes
        out.append(f"N={n} store bytes {ratio:.2f}x the unique working set (target <= 1.1): "
                   f"{'met' if ratio <= 1.1 else 'MISSED'}")
    if pre and none:
        r = pre["makespan_s"] / none["makespan_s"]
        out.append(f"N={n} prefetch makespan {r:.3f} of direct-none (target <= 0.1): "
                   f"{'met' if r <= 0.1 else 'MISSED'}")
    if pre and pc:
        r = pre["makespan_s"] / pc["makespan_s"]
        out.append(f"N={n} prefetch makespan {r:.3f} of direct-pagecache (target <= 0.5): "
                   f"{'met' if r <= 0.5 else 'MISSED'}")
    if pre and floor:
        r = pre["makespan_s"] / floor
        out.append(f"N={n} prefetch makespan {r:.2f}x the physical floor (target <= 1.5): "
                   f"{'met' if r <= 1.5 else 'MISSED'}")
    one = {m: get.get((m, 1)) for m in MODES}
    if one["scachefs-prefetch"] and one["direct-pagecache"]:
        r = one["scachefs-prefetch"]["makespan_s"] / one["direct-pagecache"]["makespan_s"]
        out.append(f"N=1 with a trace {r:.2f}x direct-pagecache (target <= 1.0): "
                   f"{'met' if r <= 1.0 else 'MISSED'}")
    if one["scachefs-cold"] and one["direct-pagecache"]:
        r = one["scachefs-cold"]["makespan_s"] / one["direct-pagecache"]["makespan_s"]
        out.append(f"N=1 cold {r:.2f}x direct-pagecache (target <= 1.2): "
                   f"{'met' if r <= 1.2 else 'MISSED'}")
    rss = [r["rss_minus_cached_mib"] for r in rows if r.get("rss_minus_cached_mib") is not None]
    if rss:
        out.append(f"daemon RSS - cached: {min(rss):.0f}..{max(rss):.0f} MiB (target <= 64): "
                   f"{'met' if max(rss) <= 64 else 'MISSED'}")
    return out


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        pts = sorted((r["n"], r["makespan_s"], r["store_bytes"] / MiB) for r in rows
                     if r["mode"] == mode and r["stagger_s"] == 0 and not r["think"])
        if not pts:
            continue
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=mode)
    for ax, title, unit in ((ax1, "storm makespan", "seconds"),
                            (ax2, "bytes read from the store", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("VMs booting at once (N)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


# ------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="N=2, tiny synthetic store: checks the harness (make test)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="nas")
    parser.add_argument("--n", default="1,4,16,32", help="storm sizes, comma separated")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--stagger", type=float, default=0.5,
                        help="also run the largest N with one VM every SECONDS (0: skip)")
    parser.add_argument("--think", action="store_true",
                        help="also replay think time (I/O stall = replay - think)")
    parser.add_argument("--vms", type=int, default=0, metavar="N",
                        help="also boot N real TCG guests at once (direct-pagecache and "
                        "scachefs-prefetch, with 512 MiB and 4 GiB of guest RAM)")
    parser.add_argument("--hosts", type=int, default=0, metavar="H",
                        help="instead: the scale-out mode, H compute hosts (network "
                        "namespaces) with the store behind sshfs in a store namespace")
    parser.add_argument("--vms-per-host", type=int, default=4, metavar="M",
                        help="VMs per host in the scale-out mode (default 4)")
    parser.add_argument("--chunk-size", default="16K",
                        help="scachefs chunk_size option (default: scachefs's default)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default: bench/results/storm.json, "
                        "or storm-multihost.json with --hosts; with --smoke a temporary "
                        "directory)")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "storm.png")
    args = parser.parse_args()
    args.json = json_path(args.json, args.smoke, args.hosts)
    if os.geteuid() != 0:
        sys.exit("bench/storm needs root (loop devices, cgroups, FUSE)")
    # Clean up (mounts, loop device) when stopped with SIGTERM too, not only Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        sys.exit(f"unknown modes: {', '.join(sorted(unknown))}")
    sizes = [2] if args.smoke else [int(x) for x in args.n.split(",")]
    if args.hosts:
        if args.hosts < 2:
            sys.exit("--hosts needs at least 2 hosts")
        sizes = [args.hosts * args.vms_per_host]
    work = Path(tempfile.mkdtemp(prefix="scachefs-storm-", dir="/var/tmp"))
    log = work / "scachefs.log"
    rows: list[dict[str, Any]] = []
    try:
        workload, base = smoke_workload(work) if args.smoke else real_workload()
        store_size = base.stat().st_size + 4 * max(sizes) * 16 * MiB + 1024 * MiB
        with loop_store(work, store_size) as store:
            shutil.copy2(base, store.root / "base.qcow2")  # its old mtime: a settled identity
            bench = Bench(store, work, workload, args.profile, log, args.chunk_size)
            print(f"workload: {workload.source}: {len(workload.requests)} requests; store "
                  f"{store.loop} ({args.profile}); log {log}", flush=True)
            bench.record_trace()
            ws = bench.working_set
            assert ws is not None
            bw, iops = PROFILES[args.profile]
            extents = len(traces.plan_runs(ws.chunks, ws.chunk_size,
                                           (store.root / "base.qcow2").stat().st_size))
            floor = max(ws.bytes / bw if bw else 0, extents / iops if iops else 0) or None
            if args.hosts:
                doc = run_multihost(bench, args.hosts, args.vms_per_host)
                direct = next(r for r in doc["rows"] if r["phase"] == "direct-sshfs")
                unique = direct["wire_bytes"] // direct["vms"]  # one VM's boot, exactly
                doc.update(profile=args.profile, workload=workload.source,
                           working_set_bytes=ws.bytes, unique_working_set_bytes=unique,
                           cgroup=str(CGROUP))
                print()
                print(multihost_table(doc, unique))
                out = args.json
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(doc, indent=2))
                print(f"\nJSON: {out}")
                return 0
            layer_size = (store.root / "base.qcow2").stat().st_size
            gaps = {}
            for gap_bytes in (0, 16 << 10, 64 << 10, 128 << 10, 256 << 10):
                runs = traces.plan_runs(ws.chunks, ws.chunk_size, layer_size,
                                        max_gap=gap_bytes // ws.chunk_size)
                nbytes = sum(length for _, length, _ in runs)
                gaps[gap_bytes] = {"requests": len(runs), "bytes": nbytes,
                                   "floor_s": max(nbytes / bw if bw else 0,
                                                  len(runs) / iops if iops else 0)}
            plan = [(m, n, 0.0) for n in sizes for m in modes]
            if args.stagger and not args.smoke:
                plan += [(m, max(sizes), args.stagger) for m in modes]
            for mode, n, stagger in plan:
                print(f"  {mode} N={n}{f' staggered {stagger} s' if stagger else ''} ...",
                      end="", flush=True)
                row = bench.run(mode, n, stagger).row()
                rows.append(row)
                print(f" {row['makespan_s']:.2f} s, {row['store_bytes'] / MiB:.1f} MiB "
                      f"in {row['store_reads']} reads", flush=True)
                if args.think and stagger == 0 and n == sizes[0]:
                    rows.append(bench.run(mode, n, 0.0, think=True).row())
            vm_rows = []
            if args.vms and not args.smoke:
                image = guest.ensure_guest_image()
                for memory in (512, 4096):
                    for mode in ("direct-pagecache", "scachefs-prefetch"):
                        print(f"  real VMs: {mode} N={args.vms} RAM {memory} MiB ...",
                              end="", flush=True)
                        vm_row = bench.run_vms(mode, args.vms, memory, image)
                        vm_rows.append(vm_row)
                        print(f" {vm_row['makespan_s']} s, per VM {vm_row['vm_seconds']}",
                              flush=True)
        summary = {"profile": args.profile, "chunk_size": args.chunk_size,
                   "cgroup": str(CGROUP),
                   "workload": workload.source,
                   "requests": len(workload.requests), "working_set_bytes": ws.bytes,
                   "working_set_extents": extents, "floor_s": floor,
                   "prefetch_gap_tradeoff": gaps, "rows": rows, "real_vms": vm_rows}
        # The unique working set: what one VM's boot needs from the store, read exactly
        # (direct-none, O_DIRECT, N=1); the trace's chunk-level set when that was not run.
        exact = [r["store_bytes"] for r in rows
                 if r["mode"] == "direct-none" and r["n"] == 1 and not r["stagger_s"]]
        unique = exact[0] if exact else ws.bytes
        summary["unique_working_set_bytes"] = unique
        summary["targets"] = targets(rows, unique, floor)
        print()
        print(table(rows, floor))
        print()
        for line in summary["targets"]:
            print("target " + line)
        for vm_row in vm_rows:
            rss = vm_row.get("rss_minus_cached_mib")
            print(f"real VMs {vm_row['mode']:<18} N={vm_row['n']} RAM {vm_row['memory_mib']:>4} "
                  f"MiB: makespan {vm_row['makespan_s']:6.2f} s, per VM {vm_row['vm_seconds']}, "
                  f"store {vm_row['store_bytes'] / MiB:.1f} MiB"
                  + (f", daemon RSS - cached {rss} MiB" if rss is not None else ""))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"\nJSON: {args.json}")
        if not args.smoke:
            plot(rows, args.plot)
            print(f"plot: {args.plot}")
    finally:
        subprocess.run(["fusermount3", "-uz", str(work / "mnt")], check=False,
                       capture_output=True)
        remove_cgroup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
