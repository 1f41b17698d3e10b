"""Locks through the mount are the store's locks (issue 16 item 13).

qemu's image locks must work between the mount and the store and between two mounts of
one store (two hosts sharing it), as they do on NFS, CephFS and GlusterFS without
scachefs: a second qemu on another host gets 'Failed to get "write" lock'. Every lock
kind (OFD, POSIX, flock) is compared with the same operation on the store, and the
locks survive a restart of the daemon.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.mounting import Mount, run
from tests.test_restart import wait_generation

HOLD = r"""
import fcntl, os, struct, sys, time
path, kind = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
if kind == "ofd":
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
elif kind == "posix":
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
else:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(600)
"""

TRY = r"""
import errno, fcntl, os, struct, sys
path, kind = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
try:
    if kind == "ofd":
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    elif kind == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif kind == "posix-wait":
        fcntl.lockf(fd, fcntl.LOCK_EX)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("ok")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""


class Holder:
    """A process that holds a lock on ``path`` until stopped."""

    def __init__(self, path: Path, kind: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), kind],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def attempt(path: Path, kind: str, timeout: float = 30) -> str:
    return run(sys.executable, "-c", TRY, path, kind, timeout=timeout).stdout.strip()


@pytest.fixture
def two_mounts(store: Path, tmp_path: Path,
               mount_factory: MountFactory) -> Iterator[tuple[Mount, Mount]]:
    """Two scachefs mounts of one store: two hosts sharing it."""
    (tmp_path / "mnt_a").mkdir()
    (tmp_path / "mnt_b").mkdir()
    yield (mount_factory(store, tmp_path / "mnt_a", "allow_other"),
           mount_factory(store, tmp_path / "mnt_b", "allow_other"))


@pytest.mark.parametrize("kind", ["ofd", "posix", "flock"])
def test_a_lock_through_one_side_conflicts_on_every_other_side(
        store: Path, two_mounts: tuple[Mount, Mount], kind: str) -> None:
    a, b = two_mounts
    (store / "f").write_bytes(b"x" * 4096)
    places = {"store": store / "f", "a": a.mountpoint / "f", "b": b.mountpoint / "f"}
    for held_at, path in places.items():
        holder = Holder(path, kind)
        try:
            for other, other_path in places.items():
                if other != held_at:
                    assert attempt(other_path, kind) == "EAGAIN", (kind, held_at, other)
        finally:
            holder.stop()
        for other_path in places.values():  # released with its holder, everywhere
            assert attempt(other_path, kind) == "ok", (kind, held_at)


def test_a_blocked_lock_waits_for_the_holder_and_a_signal_ends_the_wait(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    mount_factory(store, mnt, "allow_other")
    (store / "f").write_bytes(b"x")
    holder = Holder(store / "f", "posix")
    waiter = subprocess.Popen([sys.executable, "-c", TRY, str(mnt / "f"), "posix-wait"],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert waiter.poll() is None  # waits, as on the store
    holder.stop()
    out, _ = waiter.communicate(timeout=30)
    assert out.strip() == "ok"
    # A wait interrupted by a signal ends with EINTR (Python retries EINTR, so the
    # signal's handler raises instead).
    holder = Holder(store / "f", "posix")
    script = ("import signal, sys\n"
              "def bail(*_):\n    print('interrupted', flush=True); sys.exit(3)\n"
              "signal.signal(signal.SIGUSR1, bail)\n" + TRY)
    waiter = subprocess.Popen([sys.executable, "-c", script, str(mnt / "f"), "posix-wait"],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        waiter.send_signal(signal.SIGUSR1)
        out, _ = waiter.communicate(timeout=10)
        assert waiter.returncode == 3 and "interrupted" in out
    finally:
        waiter.kill()
        holder.stop()


def test_qemu_on_a_second_host_cannot_take_the_image_a_vm_runs_on(
        store: Path, two_mounts: tuple[Mount, Mount]) -> None:
    a, b = two_mounts
    run("qemu-img", "create", "-q", "-f", "qcow2", store / "base.qcow2", "16M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        store / "vm.qcow2")
    # The "VM" on host A: qemu-io keeps the overlay open (and locked) while it sleeps.
    vm = subprocess.Popen(["qemu-io", "-c", "sleep 600000", str(a.mountpoint / "vm.qcow2")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ino = (store / "vm.qcow2").stat().st_ino
        deadline = time.monotonic() + 20
        while f":{ino} " not in Path("/proc/locks").read_text():  # qemu locked it
            assert vm.poll() is None, vm.communicate()
            assert time.monotonic() < deadline, "the VM never locked its image"
            time.sleep(0.1)
        second = run("qemu-io", "-c", "read 0 4k", b.mountpoint / "vm.qcow2", check=False)
        assert 'Failed to get "write" lock' in second.stderr + second.stdout, second
        direct = run("qemu-io", "-c", "read 0 4k", store / "vm.qcow2", check=False)
        assert 'Failed to get "write" lock' in direct.stderr + direct.stdout, direct
        # Read-only users may share the base, as on the store.
        run("qemu-io", "-r", "-c", "read 0 4k", b.mountpoint / "base.qcow2")
        # The lock lives on through a restart of host A's daemon.
        os.kill(a.pid, signal.SIGKILL)
        wait_generation(a, 1)
        again = run("qemu-io", "-c", "read 0 4k", b.mountpoint / "vm.qcow2", check=False)
        assert 'Failed to get "write" lock' in again.stderr + again.stdout, again
    finally:
        vm.kill()
        vm.wait()
    run("qemu-io", "-c", "read 0 4k", b.mountpoint / "vm.qcow2")  # free again

