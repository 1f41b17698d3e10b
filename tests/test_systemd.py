"""scachefs under systemd: the holder's side of the protocol, here and under a real PID 1.

The first tests play systemd's side on this machine (its PID 1 is not systemd): the fd
store over a notify socket, LISTEN_FDS, Type=notify. The last boots systemd 252 as PID 1
in a systemd-nspawn container (tests/container.py) with the unit files and the mount
helper copied unchanged, and drives the documented recipes there.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from scachefs.stat import StatError, read_stats
from tests.conftest import MountFactory
from tests.mounting import mount_type, run

KiB, MiB = 1 << 10, 1 << 20
NAMES = ["scachefs-fuse", "scachefs-root", "scachefs-state", "scachefs-arena"]
# Starts a command with descriptors where systemd puts them (3, 4, ...) and LISTEN_*.
LAUNCHER = """
import fcntl, os, sys
fds = [int(v) for v in sys.argv[1].split(",") if v]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
for fd in high + [f for f in fds if f >= 3 + len(fds)]:
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
                  LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


class FakeSystemd:
    """The notify socket of a Type=notify unit with an fd store (FDSTORE=1 / FDSTOREREMOVE)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.store: dict[str, list[int]] = {}
        self.messages: list[str] = []

    def env(self) -> dict[str, str]:
        return dict(os.environ, NOTIFY_SOCKET=str(self.path))

    def receive(self, until: str, timeout: float) -> bool:
        """Take messages until one contains ``until``; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
            except TimeoutError:
                return False
            message = data.decode()
            self.messages.append(message)
            fields = dict(line.split("=", 1) for line in message.splitlines() if "=" in line)
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.store.setdefault(fields.get("FDNAME", "stored"), []).extend(
                        array.array("i", payload))
            if fields.get("FDSTOREREMOVE") == "1":
                for fd in self.store.pop(fields.get("FDNAME", ""), []):
                    os.close(fd)
            if until in message:
                return True
        return False

    def close(self) -> None:
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
        self.store.clear()
        self.sock.close()


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_fd_store_gets_a_root_it_can_keep_and_a_partial_set_is_released(
        store: Path, mnt: Path, tmp_path: Path) -> None:
    """Item 7: systemd 252 drops an O_PATH descriptor from the fd store (it cannot poll
    it), so the root must be stored O_RDONLY. A holder given an incomplete set (what that
    used to leave: 3 of 4) must release it (FDSTOREREMOVE) and replace the stale mount
    it cannot take over, never stat() it: a connection nobody serves blocks for good."""
    (store / "file").write_bytes(b"x" * 4096)
    systemd = FakeSystemd(tmp_path / "notify")
    log = open(tmp_path / "holders.log", "ab")
    command = ["-m", "scachefs", str(store), str(mnt), "-f", "-o", "allow_other"]
    first = subprocess.Popen([sys.executable, *command], env=systemd.env(), stdout=log,
                             stderr=subprocess.STDOUT)
    second = None
    try:
        assert systemd.receive("READY=1", 20), (tmp_path / "holders.log").read_text()
        assert sorted(systemd.store) == sorted(NAMES)
        root = systemd.store["scachefs-root"][0]
        assert not fcntl.fcntl(root, fcntl.F_GETFL) & os.O_PATH, "an O_PATH root descriptor"
        daemon = int(json.loads(os.getxattr(mnt, "user.scachefs.stats"))["pid"])
        first.kill()
        first.wait(timeout=10)
        os.kill(daemon, signal.SIGKILL)  # KillMode=mixed: what is left gets SIGKILL
        # What the old holder's store held once systemd refused its root: 3 of 4.
        names = ["scachefs-fuse", "scachefs-state", "scachefs-arena"]
        fds = [systemd.store.pop(n)[0] for n in names]
        started = time.monotonic()
        second = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), ":".join(names),
             *command], env=systemd.env(), pass_fds=fds, stdout=log,
            stderr=subprocess.STDOUT)
        for fd in fds:  # systemd's copies: the FDSTOREREMOVE below must close them
            systemd.store.setdefault(names[fds.index(fd)], []).append(fd)
        ready = systemd.receive("READY=1", 30)
        text = (tmp_path / "holders.log").read_text()
        assert ready, f"the new holder never became ready (a stat on the stale mount?)\n{text}"
        assert time.monotonic() - started < 15
        removed = [m for m in systemd.messages if "FDSTOREREMOVE=1" in m]
        assert {m.split("FDNAME=")[1].strip() for m in removed} >= set(names), removed
        assert sorted(systemd.store) == sorted(NAMES)  # the new mount's four, no leftovers
        assert "partial set cannot be taken over" in text, text
        assert "detaching it lazily" in text, text
        assert (mnt / "file").read_bytes() == b"x" * 4096
        assert sum(1 for line in open("/proc/self/mountinfo")
                   if f" {mnt} " in line) == 1, "the stale mount is still attached"
    finally:
        _stop(second)
        first.kill()
        first.wait()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        systemd.close()
        log.close()


FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl list-jobs ... UNIT, as systemd 252 prints it during `systemctl restart UNIT`
[ -e "{flag}" ] && echo "42 scachefs-test.service restart running"
exit 0
"""


def test_a_systemd_restart_keeps_the_mount_for_the_next_holder(
        store: Path, mnt: Path, tmp_path: Path) -> None:
    """Item 8: `systemctl restart` sends the same SIGTERM as a stop; the holder asks for
    the unit's job (systemctl list-jobs, faked here, as is the unit's cgroup) and, for a
    restart, leaves the mount and the fd store to the next holder: a file held open keeps
    working, nothing is unmounted and nothing removed from the fd store. A stop still
    unmounts and empties the fd store."""
    data = os.urandom(4 * MiB)
    (store / "disk").write_bytes(data)
    # The unit's cgroup, in systemd's hierarchy: v1 name=systemd where the host has it
    # (this one does), else cgroup2.
    hierarchy = next(Path(p) for p in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified",
                                       "/sys/fs/cgroup") if Path(p, "cgroup.procs").exists())
    cgroup = hierarchy / "scachefs-test.service"
    cgroup.mkdir(exist_ok=True)
    flag = tmp_path / "restarting"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "systemctl").write_text(FAKE_SYSTEMCTL.format(flag=flag))
    (bindir / "systemctl").chmod(0o755)
    systemd = FakeSystemd(tmp_path / "notify")
    env = dict(systemd.env(), PATH=f"{bindir}:{os.environ['PATH']}")
    log = open(tmp_path / "holders.log", "ab")
    command = ["-m", "scachefs", str(store), str(mnt), "-f", "-o", "allow_other"]
    in_unit = f"echo $$ > {cgroup}/cgroup.procs && exec \"$@\""
    first = subprocess.Popen(["sh", "-c", in_unit, "sh", sys.executable, *command], env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    second = None
    held = -1
    try:
        assert systemd.receive("READY=1", 20), (tmp_path / "holders.log").read_text()
        held = os.open(mnt / "disk", os.O_RDONLY)
        assert os.pread(held, MiB, 0) == data[:MiB]
        flag.touch()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
        text = (tmp_path / "holders.log").read_text()
        assert "leaving the mount to the next holder" in text, text
        assert not any("FDSTOREREMOVE" in m for m in systemd.messages), systemd.messages
        assert mount_type(mnt) == (str(store), "fuse.scachefs"), "the restart unmounted"
        names = sorted(systemd.store)
        assert names == sorted(NAMES)
        fds = [systemd.store[n][-1] for n in names]
        second = subprocess.Popen(
            ["sh", "-c", in_unit, "sh", sys.executable, "-c", LAUNCHER,
             ",".join(map(str, fds)), ":".join(names), *command],
            env=env, pass_fds=fds, stdout=log, stderr=subprocess.STDOUT)
        assert systemd.receive("READY=1", 20), (tmp_path / "holders.log").read_text()
        assert os.pread(held, MiB, 2 * MiB) == data[2 * MiB:3 * MiB]  # the VM never noticed
        assert (mnt / "disk").read_bytes() == data
        assert "took the mount back from systemd's fd store" in (
            tmp_path / "holders.log").read_text()
        assert sorted(systemd.store) == sorted(NAMES)
        os.close(held)
        held = -1
        flag.unlink()  # now a stop
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        assert systemd.receive("FDNAME=scachefs-arena", 10)
        assert mount_type(mnt) is None
    finally:
        if held >= 0:
            os.close(held)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        systemd.close()
        log.close()
        with open(hierarchy / "cgroup.procs", "w") as root_procs:
            for pid in (cgroup / "cgroup.procs").read_text().split():
                try:
                    root_procs.write(pid + "\n")
                    root_procs.flush()
                except OSError:
                    pass
        cgroup.rmdir()


def test_a_live_scachefs_mount_is_not_mounted_over(store: Path, mnt: Path,
                                                   mount_factory: MountFactory) -> None:
    mount_factory(store, mnt, "allow_other")
    again = run(sys.executable, "-m", "scachefs", store, mnt, check=False, timeout=30)
    assert again.returncode != 0 and "already has a live scachefs mount" in again.stderr, again


def test_require_mount_refuses_a_store_that_is_not_mounted(store: Path, mnt: Path,
                                                           tmp_path: Path) -> None:
    """Item 9: a store mounted later in boot (NFS) must not be shadowed: with
    require_mount, a SOURCE on the root file system is refused, nothing is written."""
    assert mount_type(Path("/")) is not None
    proc = run(sys.executable, "-m", "scachefs", store, mnt, "-o", "require_mount",
               check=False, timeout=30)
    assert proc.returncode != 0 and "the store is not mounted" in proc.stderr, proc
    assert mount_type(mnt) is None and not any(store.iterdir())
    run("mount", "-t", "tmpfs", "-o", "size=16m", "store", store)
    try:
        (store / "file").write_bytes(b"y" * 100)
        proc = run(sys.executable, "-m", "scachefs", store, mnt, "-o", "require_mount",
                   check=False, timeout=30)
        assert proc.returncode == 0, proc
        assert (mnt / "file").read_bytes() == b"y" * 100
        run("umount", mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        time.sleep(0.5)
        subprocess.run(["umount", "-l", str(store)], capture_output=True, check=False)


def test_restart_off_says_ready_and_survives_sighup(store: Path, mnt: Path,
                                                    tmp_path: Path) -> None:
    """Item 10: under the service (Type=notify), restart=off must still send READY=1,
    and `systemctl reload` (SIGHUP) must not kill the mount."""
    (store / "file").write_bytes(b"z" * 10)
    systemd = FakeSystemd(tmp_path / "notify")
    log = open(tmp_path / "single.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "scachefs", str(store), str(mnt), "-f",
                             "-o", "restart=off"], env=systemd.env(), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        assert systemd.receive("READY=1", 20), (tmp_path / "single.log").read_text()
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None, (tmp_path / "single.log").read_text()
        assert (mnt / "file").read_bytes() == b"z" * 10
        assert "SIGHUP (reload/upgrade) ignored" in (tmp_path / "single.log").read_text()
    finally:
        _stop(proc)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        systemd.close()
        log.close()
    assert proc.returncode == 0


def test_remount_upgrades_applies_flags_and_refuses_the_rest(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    """Item 10: `systemctl reload` of a .mount unit runs `mount -o remount,OPTIONS`:
    the helper gets `remount` and must not call it an unknown option."""
    (store / "file").write_bytes(b"r" * 10)
    mount = mount_factory(store, mnt, "allow_other", "cache_size=64M")
    before = read_stats(str(mnt))["generation"]
    same = run(sys.executable, "-m", "scachefs", store, mnt, "-o",
               "remount,allow_other,cache_size=64M,_netdev", check=False, timeout=60)
    assert same.returncode == 0, same
    assert read_stats(str(mnt))["generation"] > before
    ro = run(sys.executable, "-m", "scachefs", store, mnt, "-o",
             "remount,allow_other,cache_size=64M,ro", check=False, timeout=60)
    assert ro.returncode == 0, ro
    assert "ro" in [o for line in open("/proc/self/mountinfo") if f" {mnt} " in line
                    for o in line.split()[5].split(",")]
    changed = run(sys.executable, "-m", "scachefs", store, mnt, "-o",
                  "remount,allow_other,cache_size=128M,prefetch=off", check=False, timeout=60)
    assert changed.returncode != 0, changed
    assert "cache_size, prefetch cannot change on a live mount" in changed.stderr, changed
    assert (mnt / "file").read_bytes() == b"r" * 10
    try:
        read_stats(str(mnt))
    except StatError as exc:
        raise AssertionError(f"the mount is gone: {exc}") from None
    assert mount.proc.poll() is None


# --------------------------------------------------------------------------- real systemd

READER = Path(__file__).with_name("sysd_reader.py")
DATA = 32 * MiB
SVC = r"scachefs@var-lib-vm\x2dsvc.service"  # a mount point with "-": /var/lib/vm-svc
OPTS = "allow_other,cache_size=64M,layers=all,record=off,prefetch=off,require_mount"
UNITS = {
    # The store: a bind mount (a "network" one, _netdev) that comes up 3 s into boot.
    "store-delay.service": """[Unit]
Description=the store comes up late
DefaultDependencies=no
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sleep 3
""",
    "srv-images.mount": """[Unit]
Description=the image store (late)
Requires=store-delay.service
After=store-delay.service
[Mount]
What=/var/store-data
Where=/srv/images
Type=none
Options=bind,_netdev
[Install]
WantedBy=remote-fs.target
""",
    # What a VM unit does per docs/operations.md, for the service and for the .mount.
    "vm-svc.service": f"""[Unit]
Requires={SVC}
After={SVC}
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'cmp /var/lib/vm-svc/data /var/store-data/data && touch /run/vm-svc.ok'
[Install]
WantedBy=multi-user.target
""",
    "vm-mnt.service": """[Unit]
RequiresMountsFor=/var/lib/scache
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'cmp /var/lib/scache/data /var/store-data/data && touch /run/vm-mnt.ok'
[Install]
WantedBy=multi-user.target
""",
}
FSTAB = ("/srv/images /var/lib/vm-cache fuse.scachefs "
         f"{OPTS},_netdev,x-systemd.requires-mounts-for=/srv/images 0 0\n")


def _setup_root(root: Path) -> None:
    """The unit files and the mount helper as shipped, plus the store, a delayed store
    mount, VM units ordered as the docs say, an fstab line, and the reader."""
    systemd = root / "etc/systemd/system"
    for name in ("scachefs@.service", "var-lib-scache.mount"):
        (systemd / name).write_bytes((Path(__file__).parent.parent / "mount-helpers" / name)
                                     .read_bytes())
    for name, text in UNITS.items():
        (systemd / name).write_text(text)
    # The example .mount's options, for this test: layers=all so that the reader's file is
    # served by the daemon (a plain file would go through passthrough, never stalling).
    dropin = systemd / "var-lib-scache.mount.d"
    dropin.mkdir()
    (dropin / "test.conf").write_text(f"[Mount]\nOptions={OPTS},_netdev\n")
    # The documented recipe for the service and a store that mounts later.
    dropin = systemd / f"{SVC}.d"
    dropin.mkdir()
    (dropin / "store.conf").write_text("[Unit]\nRequiresMountsFor=/srv/images\n")
    config = root / "etc/scachefs/var/lib/vm-svc.conf"
    config.parent.mkdir(parents=True)
    config.write_text(f"SCACHEFS_SOURCE=/srv/images\nSCACHEFS_OPTIONS={OPTS}\n")
    for target, units in (("remote-fs.target", ["var-lib-scache.mount", "srv-images.mount"]),
                          ("multi-user.target", [SVC, "vm-svc.service", "vm-mnt.service"])):
        wants = systemd / f"{target}.wants"
        wants.mkdir(exist_ok=True)
        for unit in units:
            source = "scachefs@.service" if unit.startswith("scachefs@") else unit
            (wants / unit).symlink_to(f"/etc/systemd/system/{source}")
    with open(root / "etc/fstab", "a") as fstab:
        fstab.write(FSTAB)
    for path in ("srv/images", "var/lib/scache", "var/lib/vm-cache", "var/lib/vm-svc",
                 "var/store-data"):
        (root / path).mkdir(parents=True, exist_ok=True)
    (root / "var/store-data/data").write_bytes(os.urandom(DATA))
    (root / "root/reader.py").write_bytes(READER.read_bytes())


class Figures:
    """Client errors and the worst stall per event, for the closing note."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, object]] = {}

    def add(self, name: str, result: dict[str, object], command: str) -> None:
        self.rows[name] = dict(result, command=command)
        print(f"{name:28} errors {result['errors']:3}  worst stall {result['worst_stall']:6.3f}"
              f" s  reads {result['reads']:6}  ({command})")


def _measured(box: object, name: str, path: str, command: str, figures: Figures,
              wait: str = "", before: float = 1.5, after: float = 2.0) -> dict[str, object]:
    """Run the reader on path around `command` (then `wait`, a shell condition polled up
    to 30 s); its result."""
    from tests.container import Container
    assert isinstance(box, Container)
    tag = name.replace(" ", "-")
    reader = box.popen(["python3", "/root/reader.py", path, "/var/store-data/data", tag])
    time.sleep(before)
    assert reader.poll() is None, reader.communicate()
    box.run(command, timeout=90)
    if wait:
        box.run(f"for i in $(seq 300); do {wait} && exit 0; sleep 0.1; done; exit 1", timeout=60)
    time.sleep(after)
    box.run(["touch", f"/run/reader.{tag}.stop"])
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    result: dict[str, object] = json.loads(out)
    figures.add(name, result, command)
    return result


def _fd_store(box: object, unit: str) -> int:
    from tests.container import Container
    assert isinstance(box, Container)
    return int(box.run(["systemctl", "show", "-P", "NFileDescriptorStore", unit]).stdout)


def _mounts_at(box: object, path: str) -> list[str]:
    from tests.container import Container
    assert isinstance(box, Container)
    lines = box.run(["cat", "/proc/self/mountinfo"]).stdout.splitlines()
    return [line.split(" - ")[1].split()[0] for line in lines if line.split()[4] == path]


def test_units_under_systemd_as_pid1(tmp_path: Path) -> None:
    """Boot systemd 252 as PID 1 (systemd-nspawn) with the shipped unit files and drive
    them: mounts at boot after a store that comes up 3 s late (the .mount unit, an fstab
    line, the service for a mount point with "-"), VM units ordered as documented, then
    reload, daemon SIGKILL, holder SIGKILL, restart and stop, busy and idle, with a
    reader that checks every byte and counts errors."""
    from tests import container

    missing = container.missing_tools()
    assert not missing, f"missing {missing}: `make setup` installs systemd-container, " \
                        "debootstrap and util-linux"
    started = time.monotonic()
    _, build = container.ensure_root()
    print(f"container root {container.ROOT_VERSION}: built once in {build['build_seconds']} s "
          f"(cached); ready here in {time.monotonic() - started:.1f} s")
    wheels = container.build_wheels(tmp_path / "wheels")
    assert any(w.name.startswith("scachefs-") for w in wheels)
    figures = Figures()
    with container.booted(_setup_root, tmp_path / "wheels") as box:
        boot_seconds = box.boot_seconds
        # ------------------------------------------------------------------ boot
        box.run("for i in $(seq 600); do s=$(systemctl is-system-running); "
                "[ \"$s\" = running ] || [ \"$s\" = degraded ] && exit 0; sleep 0.1; done; "
                "exit 1", timeout=90)
        state = box.run(["systemctl", "is-system-running"], check=False).stdout.strip()
        failed = box.run(["systemctl", "--failed", "--no-legend", "--plain"]).stdout
        assert state == "running", f"{state}: {failed}\n{box.journal(lines=300)}"
        for path in ("/var/lib/scache", "/var/lib/vm-cache", "/var/lib/vm-svc"):
            assert _mounts_at(box, path) == ["fuse.scachefs"], (path, box.journal())
        # Nothing served or written before the store was there: the directory under the
        # store's mount is still empty.
        box.run("mkdir -p /run/rootview && mount --bind / /run/rootview")
        under = box.run(["ls", "-A", "/run/rootview/srv/images"]).stdout.split()
        assert under == [], f"the store's mount point was written into: {under}"
        assert box.run("test -e /run/vm-svc.ok && test -e /run/vm-mnt.ok",
                       check=False).returncode == 0, box.journal(lines=300)
        # The .mount unit's LimitNOFILE= reached the daemon, which raised its soft limit.
        limits = box.run("pid=$(pgrep -f 'serve-fd[s].* /var/lib/scache ' | head -1); "
                         "grep 'Max open files' /proc/$pid/limits").stdout.split()
        assert limits[3] == limits[4], limits
        assert _fd_store(box, SVC) == 4
        # Ordered after the store (3 s late), not merely refused before it.
        def monotonic(unit: str, what: str) -> int:
            return int(box.run(["systemctl", "show", "-P", f"{what}TimestampMonotonic",
                                unit]).stdout)
        store_up = monotonic("srv-images.mount", "ActiveEnter")
        for unit in ("var-lib-scache.mount", r"var-lib-vm\x2dcache.mount", SVC):
            assert monotonic(unit, "InactiveExit") >= store_up, unit
        print(f"booted in {boot_seconds:.1f} s; the store came up "
              f"{(store_up - monotonic('sysinit.target', 'ActiveEnter')) / 1e6:.1f} s after "
              "sysinit.target, every scachefs mount after it")
        # A service instance without its configuration says which file to write.
        missing = box.run(["systemctl", "start", "scachefs@var-lib-nothing.service"],
                          check=False)
        assert missing.returncode != 0
        assert "write it to /etc/scachefs/var/lib/nothing.conf" in box.journal(
            "scachefs@var-lib-nothing.service"), box.journal("scachefs@var-lib-nothing.service")
        # ------------------------------------------------------------------ busy events
        svc_path = "/var/lib/vm-svc/data"
        gen = ("[ $(scachefs-stat --json /var/lib/vm-svc | python3 -c 'import json,sys; "
               "print(json.load(sys.stdin)[\"generation\"])') -ge {} ]")
        events = [
            ("reload", f"systemctl reload '{SVC}'", gen.format(1)),
            ("daemon SIGKILL", "pkill -KILL -f 'serve-fd[s].* /var/lib/vm-svc '", gen.format(2)),
            ("holder SIGKILL", f"systemctl kill -s KILL --kill-who=main '{SVC}'",
             gen.format(3)),
            ("systemctl restart", f"systemctl restart '{SVC}'", gen.format(4)),
        ]
        rounds = 2
        for i in range(rounds * len(events)):
            name, command, wait = events[i % len(events)]
            if i >= len(events):
                wait = gen.format(len(events) * (i // len(events)) + 1 + i % len(events))
                name = f"{name} ({i // len(events) + 1})"
            result = _measured(box, name, svc_path, command, figures, wait)
            assert box.run(["systemctl", "is-active", SVC], check=False).stdout.strip() \
                == "active", box.journal(SVC)
            assert _mounts_at(box, "/var/lib/vm-svc") == ["fuse.scachefs"], box.journal(SVC)
            assert _fd_store(box, SVC) == 4, box.journal(SVC)
            assert result["errors"] == 0, (name, result, box.journal(SVC))
            assert float(str(result["worst_stall"])) < 5, (name, result)
        result = _measured(box, ".mount reload", "/var/lib/scache/data",
                           "systemctl reload var-lib-scache.mount", figures)
        assert result["errors"] == 0, (result, box.journal("var-lib-scache.mount"))
        assert _mounts_at(box, "/var/lib/scache") == ["fuse.scachefs"]
        # ------------------------------------------------------------------ restart=off
        # One process under the service: READY=1 all the same, and a reload (SIGHUP)
        # leaves the mount alone.
        box.run("mkdir -p /var/lib/single && printf 'SCACHEFS_SOURCE=/srv/images\\n"
                f"SCACHEFS_OPTIONS={OPTS},restart=off\\n' > /etc/scachefs/var/lib/single.conf")
        box.run(["systemctl", "start", "scachefs@var-lib-single.service"], timeout=60)
        box.run(["systemctl", "reload", "scachefs@var-lib-single.service"], timeout=60)
        time.sleep(1)
        assert box.run(["systemctl", "is-active", "scachefs@var-lib-single.service"],
                       check=False).stdout.strip() == "active"
        assert box.run(["cmp", "/var/lib/single/data", "/var/store-data/data"]).returncode == 0
        box.run(["systemctl", "stop", "scachefs@var-lib-single.service"], timeout=60)
        assert _mounts_at(box, "/var/lib/single") == []
        # ------------------------------------------------------------------ stop, busy
        tag = "stop-busy"
        reader = box.popen(["python3", "/root/reader.py", svc_path, "/var/store-data/data",
                            tag])
        time.sleep(1.5)
        t = time.monotonic()
        box.run(["systemctl", "stop", SVC], timeout=60)
        stop_seconds = time.monotonic() - t
        box.run(["touch", f"/run/reader.{tag}.stop"])
        out, _ = reader.communicate(timeout=60)
        busy_stop = json.loads(out)
        print(f"stop of a busy mount: {stop_seconds:.1f} s; the reader then got "
              f"{busy_stop['errors']} errors, e.g. {busy_stop['events'][:1]}")
        # As documented: open files served 10 s more (STOP_GRACE), then ENOTCONN; the
        # unit ends cleanly within its TimeoutStopSec.
        assert 8 < stop_seconds < 25, stop_seconds
        assert box.run(["systemctl", "is-active", SVC], check=False).stdout.strip() \
            == "inactive", box.journal(SVC)
        assert _mounts_at(box, "/var/lib/vm-svc") == []
        assert _fd_store(box, SVC) == 0
        # ------------------------------------------------------------------ idle
        box.run(["systemctl", "start", SVC], timeout=60)
        box.run(["systemctl", "restart", SVC], timeout=60)
        assert _mounts_at(box, "/var/lib/vm-svc") == ["fuse.scachefs"]
        assert _fd_store(box, SVC) == 4
        assert box.run(["cmp", svc_path, "/var/store-data/data"]).returncode == 0
        t = time.monotonic()
        box.run(["systemctl", "stop", SVC], timeout=60)
        assert time.monotonic() - t < 5
        assert _mounts_at(box, "/var/lib/vm-svc") == []
        assert _fd_store(box, SVC) == 0
        journal = box.journal(SVC, lines=1000)
        assert "Failed to add fd to store" not in box.journal(lines=3000)
        assert "Traceback" not in journal, journal
    (tmp_path / "figures.json").write_text(json.dumps(figures.rows, indent=2))
    print(json.dumps(figures.rows, indent=2))
