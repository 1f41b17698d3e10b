"""An open for writing that never writes costs a layer nothing (issue 19 item 1).

libvirt (dynamic_ownership with remember_owner, its defaults) opens a VM's base
O_RDWR at domain stop to restore its owner, while other VMs still run from that base.
The layer's cache stays until a handle actually changes the file; from that moment
every reader gets the new bytes (never stale).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.mounting import run, settle
from tests.test_shadow_cache import layer_stats, overlay

PUNCH_HOLE_KEEP_SIZE = 0x02 | 0x01
KiB = 1 << 10
MiB = 1 << 20


def make_layer(store: Path, size: int = 4 * MiB) -> bytes:
    data = random.Random(9).randbytes(size)
    (store / "base.raw").write_bytes(data)
    overlay(store, "vm.qcow2", "base.raw", fmt="raw")
    settle(store / "base.raw")
    return data


def direct_read(fd: int, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)
    try:
        got = os.preadv(fd, [buf], offset)
        return buf[:got]
    finally:
        buf.close()


@pytest.mark.parametrize("change", ["write", "fallocate", "copy_file_range", "mmap"])
def test_an_idle_writer_keeps_the_cache_and_its_first_change_is_seen_at_once(
        store: Path, mnt: Path, mount_factory: MountFactory, change: str) -> None:
    data = make_layer(store)
    mount_factory(store, mnt, "allow_other", "prefetch=off", "record=off")
    run("qemu-io", "--cache=none", "-r", "-c", "read 0 4M", mnt / "vm.qcow2")
    assert layer_stats(mnt, "base.raw")["resident_bytes"] == 4 * MiB
    reader = os.open(mnt / "base.raw", os.O_RDONLY | os.O_DIRECT)  # a VM (cache=none)
    writer = os.open(mnt / "base.raw", os.O_RDWR)  # libvirtd restoring the owner
    try:
        os.fchown(writer, os.getuid(), os.getgid())
        before = layer_stats(mnt, "base.raw")
        assert before["resident_bytes"] == 4 * MiB  # the open cost nothing
        assert direct_read(reader, 0, 64 * KiB) == data[:64 * KiB]
        assert layer_stats(mnt, "base.raw")["store_bytes"] == before["store_bytes"]
        new = b"\x5a" * (64 * KiB)
        if change == "write":
            assert os.pwrite(writer, new, 0) == len(new)
        elif change == "fallocate":  # punch a hole: zeros, with no write at all
            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
            assert libc.fallocate(writer, PUNCH_HOLE_KEEP_SIZE, 0, 64 * KiB) == 0
            new = bytes(64 * KiB)
        elif change == "copy_file_range":
            (store / "src.raw").write_bytes(new)
            src = os.open(mnt / "src.raw", os.O_RDONLY)
            try:
                assert os.copy_file_range(src, writer, len(new), 0, 0) == len(new)
            finally:
                os.close(src)
        else:
            with mmap.mmap(writer, 64 * KiB) as m:
                m[:] = new
                m.flush()
        assert direct_read(reader, 0, 64 * KiB) == new, change
        assert (store / "base.raw").read_bytes()[:64 * KiB] == new
    finally:
        os.close(writer)
        os.close(reader)
    want = "0x00" if change == "fallocate" else "0x5a"
    out = run("qemu-io", "--cache=none", "-r", "-c", f"read -P {want} 0 64k",
              mnt / "vm.qcow2").stdout
    assert "verification failed" not in out and "read 65536/65536" in out, out
