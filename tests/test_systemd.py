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
