"""The daemon dies, or the mount is pulled, under running VMs: what they see, what survives.

kill -9 in the middle of a boot storm (four readers and a writer that flushes):
the clients get clean errnos, every write that was acknowledged (flushed) is on
the store, the images check clean, the boot traces recorded before survive and a
fresh mount with prefetch=mount has the working set resident again within seconds.
And umount: refused while a VM holds a file, lazy umount lets the VM finish.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.mounting import mount_type, run
from tests.test_boot_traces import (
    boot_script,
    make_boot_base,
    prefetched,
    record_one_boot,
    replay_args,
    wait_for,
)
from tests.test_faults import (
    STAT,
    IoResult,
    alive,
    image_check,
    qio,
    slow_reader,
    wait_resident,
)
from tests.test_qemu_passthrough import make_base
from tests.test_shadow_cache import overlay

KiB, MiB = 1 << 10, 1 << 20
ECONNABORTED_TEXT = os.strerror(errno.ECONNABORTED)  # "Software caused connection abort"
ENOTCONN_TEXT = os.strerror(errno.ENOTCONN)  # "Transport endpoint is not connected"
SLOT = 128 * KiB  # the writer's i-th write goes to i * SLOT


def pattern(i: int) -> int:
    return 0x80 + i % 100  # never the base's 0x42 nor zero


def base_pattern(offset: int) -> int:
    return 0x42 if offset < 64 * MiB else 0  # make_boot_base: 0x42 in the first 64 MiB


def errors_in(output: str) -> set[str]:
    """The error texts qemu-io printed: the part after the last ': ' of each error line."""
    found = set()
    for line in output.splitlines():
        if " failed: " in line or "can't open" in line or "Failed to" in line:
            found.add(line.rsplit(": ", 1)[-1].strip())
    return found


class Writer(threading.Thread):
    """A VM that writes and flushes: one qemu-io per write (`write -P`, `flush`), so that
    exit status 0 means the write and its flush were acknowledged."""

    def __init__(self, image: Path) -> None:
        super().__init__(daemon=True)
        self.image = image
        self.acked: list[int] = []
        self.failed: list[tuple[int, IoResult]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        for i in range(1000):  # 1000 slots of 128 KiB in the 128 MiB image
            if self.stop.is_set() or len(self.failed) >= 2:
                return
            result = qio(self.image, f"write -P {pattern(i):#x} {i * SLOT} 64k", "flush")
            if result.returncode == 0 and result.done == [("wrote", i * SLOT, 64 * KiB)]:
                self.acked.append(i)
            else:
                self.failed.append((i, result))


@pytest.mark.parametrize("path", ["passthrough=auto", "passthrough=off"],
                         ids=["kernel", "daemon"])
def test_kill_9_in_a_boot_storm_loses_no_acknowledged_write(
        store: Path, mnt: Path, mount_factory: MountFactory, path: str) -> None:
    make_boot_base(store)
    first = record_one_boot(store, mnt, mount_factory)  # a trace of base.qcow2, on the store
    traces = store / ".scache" / "traces"
    recorded = {p.name: p.read_bytes() for p in traces.iterdir()}
    for i in range(4):
        overlay(store, f"r{i}.qcow2", "base.qcow2")
    overlay(store, "w.qcow2", "base.qcow2")
    # restart=off: what a VM sees when the daemon dies and nothing takes over (with the
    # holder, test_restart.py).
    mount = mount_factory(store, mnt, "allow_other", path, "restart=off")

    script = boot_script(think_ms=5)
    readers = [subprocess.Popen(replay_args(mnt / f"r{i}.qcow2", script), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for i in range(4)]
    writer = Writer(mnt / "w.qcow2")
    writer.start()
    try:
        deadline = time.monotonic() + 20
        while len(writer.acked) < 8:
            assert not writer.failed, writer.failed[0][1].output
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.01)
        # Mid-storm: every reader is still booting when the daemon dies.
        assert all(reader.poll() is None for reader in readers)
        held = os.open(mnt / "r0.qcow2", os.O_RDONLY)  # a VM's descriptor across the crash
        os.kill(mount.pid, signal.SIGKILL)
        assert mount.proc.wait(timeout=10) == -signal.SIGKILL
        outputs = [reader.communicate(timeout=60)[0] for reader in readers]
        writer.join(timeout=30)
        assert not writer.is_alive()

        # What the VMs saw: requests in flight at the kill get ECONNABORTED, every later
        # request and open ENOTCONN; never EIO, never wrong bytes.
        seen: set[str] = set()
        for out in outputs:
            assert "Pattern verification failed" not in out, out
            assert errors_in(out), out
            seen |= errors_in(out)
        assert all(reader.returncode != 0 for reader in readers)
        assert len(writer.failed) == 2
        for _, result in writer.failed:
            assert result.returncode != 0 and not result.wrong_bytes, result.output
            seen |= errors_in(result.output)
        assert ENOTCONN_TEXT in seen and seen <= {ENOTCONN_TEXT, ECONNABORTED_TEXT}, seen
        # The dead mount answers ENOTCONN (only attributes the kernel cached still show);
        # scachefs-stat says what to do.
        try:
            os.listdir(mnt)
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN, exc
        else:
            raise AssertionError("a dead mount listed its root")
        dead = run(*STAT, mnt, check=False)
        assert dead.returncode != 0 and "daemon is dead" in dead.stderr, dead.stderr
        assert f"fusermount3 -uz {mnt}" in dead.stderr
    finally:
        writer.stop.set()
        for reader in readers:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        mount.kill()  # SIGKILL if still alive, then fusermount3 -uz of the dead mount
    assert mount_type(mnt) is None
    started = time.monotonic()
    fresh = mount_factory(store, mnt, "allow_other", "prefetch=mount")
    layer = wait_for(mnt, "base.qcow2", prefetched, timeout=10)
    warm_seconds = time.monotonic() - started
    assert warm_seconds < 5, warm_seconds
    assert layer["prefetch"]["reason"] == "mount" and layer["prefetch"]["error"] is None
    assert layer["resident_bytes"] >= first["trace"]["bytes"]
    assert layer["trace"]["status"] == "ready" and layer["trace"]["boots"] == 1
    assert {p.name: p.read_bytes() for p in traces.iterdir()} == recorded
    if path == "passthrough=off":
        # A descriptor opened before the crash stays dead after the remount: the VM must
        # reopen its disk (be restarted); the new mount does not revive it.
        with pytest.raises(OSError) as dead_read:
            os.pread(held, 4096, 0)
        assert dead_read.value.errno == errno.ENOTCONN
        os.close(held)  # read-only: no flush goes to the dead connection
    else:
        # The kernel reads a passed-through file itself: the daemon's death does not
        # touch a descriptor the VM already holds.
        assert os.pread(held, 4, 0) == b"QFI\xfb"
        os.close(held)

    # Every acknowledged write is there, through the new mount and on the store.
    checks = [f"read -P {pattern(i):#x} {i * SLOT} 64k" for i in writer.acked]
    for image in (mnt / "w.qcow2", store / "w.qcow2"):
        back = qio(image, *checks)
        assert back.returncode == 0 and not back.failures and not back.wrong_bytes, back.output
        assert len(back.done) == len(writer.acked) >= 8
    # The write in flight at the kill is all there or not at all (the base shows).
    torn, _ = writer.failed[0]
    new = qio(mnt / "w.qcow2", f"read -P {pattern(torn):#x} {torn * SLOT} 64k")
    if new.returncode != 0:
        old = qio(mnt / "w.qcow2", f"read -P {base_pattern(torn * SLOT):#x} {torn * SLOT} 64k")
        assert old.returncode == 0, (new.output, old.output)
    image_check(store / "w.qcow2")
    image_check(mnt / "w.qcow2")
    alive(fresh)


def test_umount_of_a_busy_mount_fails_and_lazy_umount_lets_the_reader_finish(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    overlay(store, "vm2.qcow2", "base.qcow2")
    old = mount_factory(store, mnt, "allow_other")
    reader = slow_reader(mnt / "vm.qcow2", "read -P 0xa1 0 1M", "sleep 4000",
                         "read -P 0xb2 8M 3M", "read -P 0xc3 40M 64k")
    try:
        wait_resident(mnt, "base.qcow2", MiB, reader)  # it has read, it holds the file open
        busy = run("umount", mnt, check=False)  # the VM holds its disk open
        assert busy.returncode != 0 and "target is busy" in busy.stderr, busy
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.umount2(os.fsencode(mnt), 0) == -1 and ctypes.get_errno() == errno.EBUSY
        alive(old)
        other = qio(mnt / "vm2.qcow2", "read -P 0xb2 8M 64k")
        assert other.returncode == 0 and not other.wrong_bytes, other.output

        lazy = run("umount", "-l", mnt, check=False)
        assert lazy.returncode == 0, lazy
        assert mount_type(mnt) is None
        assert old.proc.poll() is None  # detached, still serving the open file
        # The operator mounts again at once; the old daemon's exit must not undo it.
        fresh = mount_factory(store, mnt, "allow_other")
        out, _ = reader.communicate(timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    result = IoResult(reader.returncode, out)
    assert result.returncode == 0 and not result.wrong_bytes, out
    assert result.done == [("read", 0, MiB), ("read", 8 * MiB, 3 * MiB),
                           ("read", 40 * MiB, 64 * KiB)], out
    assert old.proc.wait(timeout=15) == 0  # it exits cleanly once its last file closed
    assert f"unmounted {mnt}" in old.log()
    alive(fresh)
    after = qio(mnt / "vm2.qcow2", "read -P 0xc3 40M 64k")
    assert after.returncode == 0 and not after.wrong_bytes, after.output
