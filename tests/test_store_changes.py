"""A layer changed on the store behind the mount's back (issue 17, items 0b and 0e).

A write on the store sets the file's mtime before its data lands, so an identity read
while a write is under way may be the final one with old bytes under it: nothing read
under an identity younger than the settle time is cached. A layer that shrank on the
store answers what the store answers (a short read), never EIO.
"""

from __future__ import annotations

import mmap
import os
import random
import time
from pathlib import Path

from scachefs.fs import SETTLE_SECONDS
from tests.conftest import MountFactory
from tests.test_shadow_cache import layer_stats

MiB = 1 << 20


def read_all(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def test_bytes_read_while_a_write_lands_are_never_cached(store: Path, mnt: Path,
                                                         mount_factory: MountFactory) -> None:
    size = 4 * MiB
    old, new = random.Random(1).randbytes(size), random.Random(2).randbytes(size)
    base = store / "base.raw"
    base.write_bytes(old)
    os.utime(base, (time.time() - 3600,) * 2)
    mount_factory(store, mnt, "layers=all", "cache_size=64M", "prefetch=off", "record=off")
    assert read_all(mnt / "base.raw") == old  # cached under the old identity
    # One write on the store, as the kernel does it: the mtime first, then the data. A
    # reader that opens in between sees the final identity and half of the old bytes.
    with open(base, "r+b") as f:
        f.write(new[:size // 2])
        f.flush()
        mtime = os.fstat(f.fileno()).st_mtime_ns
        assert read_all(mnt / "base.raw") == new[:size // 2] + old[size // 2:]
        f.write(new[size // 2:])
    os.utime(base, ns=(mtime, mtime))  # the write's one mtime: the identity is unchanged
    assert read_all(mnt / "base.raw") == new
    # Once the identity is settled, reads are cached again.
    time.sleep(SETTLE_SECONDS + 0.2)
    assert read_all(mnt / "base.raw") == new
    before = layer_stats(mnt, "base.raw")["store_bytes"]
    assert read_all(mnt / "base.raw") == new
    assert layer_stats(mnt, "base.raw")["store_bytes"] == before


def test_a_layer_truncated_on_the_store_reads_as_the_store_says(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    size = 4 * MiB
    data = random.Random(3).randbytes(size)
    base = store / "base.raw"
    base.write_bytes(data)
    os.utime(base, (time.time() - 3600,) * 2)
    mount_factory(store, mnt, "layers=all", "cache_size=64M", "prefetch=off", "record=off")
    fd = os.open(mnt / "base.raw", os.O_RDONLY | os.O_DIRECT)
    aligned = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
    try:
        assert os.preadv(fd, [aligned], 0) == MiB
        assert aligned[:] == data[:MiB]
        os.truncate(base, 2 * MiB)  # on the store, behind the mount's back
        for at, want in ((3 * MiB, b""), (MiB, data[MiB:2 * MiB])):
            got = os.preadv(fd, [aligned], at)
            assert got == len(want) and aligned[:got] == want, (at, got)
    finally:
        os.close(fd)
        aligned.close()
    assert read_all(mnt / "base.raw") == data[:2 * MiB]
