"""Races between handlers, driven step by step on a ScacheFS without a mount.

The review of issue 10 suspected six races and leaks that need a precise
interleaving of awaits; a real mount cannot produce them on demand. Here the
handlers run on a real store directory, and a gate holds chosen worker calls
until the test has made the other move.
"""

from __future__ import annotations

import os
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from scachefs.boots import Boots
from scachefs.chunkcache import ChunkCache
from scachefs.fs import LayerHandle, ScacheFS
from scachefs.fuse.ops import Entry, Opened, SetAttr
from scachefs.inodes import ROOT_INODE
from scachefs.layer import Layer, identity_of
from scachefs.options import MountOptions
from scachefs.recorder import BootSession
from scachefs.traces import Boot, LayerId, TraceFile, TraceStore, fingerprint
from scachefs.workers import WorkerPool
from tests.mounting import run

pytestmark = pytest.mark.trio

CTX: Any = types.SimpleNamespace(uid=0, gid=0, pid=0, umask=0)
MiB = 1 << 20


class Gate:
    """Holds the first worker call that ``match`` accepts until ``open()``."""

    def __init__(self, workers: WorkerPool, match: Callable[[Any], bool]) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()
        self._armed = True
        original = workers.run

        async def run(fn: Callable[..., Any], *args: Any) -> Any:
            if self._armed and match(fn):
                self._armed = False
                self.entered.set()
                await self.release.wait()
            return await original(fn, *args)

        workers.run = run  # type: ignore[method-assign]


def make_fs(store: Path, tmp_path: Path, **options: Any) -> ScacheFS:
    opts = MountOptions(cache_size=64 * MiB, host_id="test", **options)
    root = os.open(store, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return ScacheFS(root, opts, str(store), str(tmp_path / "mnt"))


def make_stack(store: Path, size: int = 4 * MiB) -> Path:
    base = store / "base.raw"
    base.write_bytes(b"\xa1" * size)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
        store / "vm.qcow2")
    return base


def stack_fs(tmp_path: Path) -> tuple[ScacheFS, Path]:
    """A store with base.raw under vm.qcow2, and a ScacheFS over it (not started yet)."""
    store = tmp_path / "store"
    store.mkdir()
    base = make_stack(store)
    return make_fs(store, tmp_path), base


@asynccontextmanager
async def serving(fs: ScacheFS) -> AsyncIterator[tuple[trio.Nursery, Entry]]:
    """fs started in a nursery, with base.raw looked up; its tasks end with the block."""
    async with trio.open_nursery() as nursery:
        fs.boots.nursery = nursery
        await fs.scan()
        fs.scanned.set()
        yield nursery, await fs.lookup(ROOT_INODE, b"base.raw", CTX)
        nursery.cancel_scope.cancel()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def spawn(nursery: trio.Nursery, fn: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run fn in the nursery; the list gets its result (or exception) when it ends."""
    out: list[Any] = []

    async def task() -> None:
        try:
            out.append(await fn())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    nursery.start_soon(task)
    return out


async def test_lookup_of_dotdot_leaves_the_grandparent_its_name(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "a" / "b" / "c").mkdir(parents=True)
    fs = make_fs(store, tmp_path)
    a = await fs.lookup(ROOT_INODE, b"a", CTX)
    b = await fs.lookup(a.nodeid, b"b", CTX)
    c = await fs.lookup(b.nodeid, b"c", CTX)
    up = await fs.lookup(c.nodeid, b"..", CTX)  # what the NFS-export path sends
    assert up.nodeid == b.nodeid
    node_b = fs.table.get(b.nodeid)
    assert node_b is not None and (node_b.parent, node_b.name) == (a.nodeid, b"b")
    node_c = fs.table.get(c.nodeid)
    assert node_c is not None and fs.table.relpath(node_c) == b"a/b/c"


async def test_a_failed_attach_closes_the_descriptor_it_opened(tmp_path: Path) -> None:
    fs, _ = stack_fs(tmp_path)
    async with serving(fs) as (_, entry):

        def broken(*args: Any) -> Layer:
            raise RuntimeError("a bug in _attach")

        fs._attach = broken  # type: ignore[method-assign]
        before = open_fds()
        with pytest.raises(RuntimeError):  # the session answers EIO and logs it
            await fs.open(entry.nodeid, os.O_RDONLY, CTX)
        assert open_fds() == before
        assert fs.files == {}


async def test_a_layer_dropped_while_its_traces_load_is_not_prefetched(tmp_path: Path) -> None:
    fs, base = stack_fs(tmp_path)
    assert fs.boots.store is not None
    st = os.stat(base)  # a trace of the layer, so that its first open would prefetch
    boot = Boot(0, 1000, 64, MiB, [(i, i, 0) for i in range(64)])
    fd = os.open(base, os.O_RDONLY)
    try:
        fp = fingerprint(fd, st.st_size)
    finally:
        os.close(fd)
    fs.boots.store.save(TraceFile(LayerId(fp, st.st_size, st.st_mtime_ns),
                                  fs.cache.chunk_size, "other-host", [boot]))
    async with serving(fs) as (nursery, entry):
        gate = Gate(fs.workers, lambda fn: fn == fs.boots.store.load)  # type: ignore[union-attr]
        reader = await spawn(nursery, lambda: fs.open(entry.nodeid, os.O_RDONLY, CTX))
        await gate.entered.wait()
        layer = next(iter(fs.layers.values()))
        writer = await fs.open(entry.nodeid, os.O_RDWR, CTX)
        await fs.write(writer.fh, 0, b"\0", False)  # its first write drops the layer
        assert not layer.active
        gate.release.set()
        while not reader:
            await trio.sleep(0.01)
        info = reader[0]
        assert isinstance(info, Opened), info
        handle = fs.files[info.fh]
        assert isinstance(handle, LayerHandle) and handle.layer is None  # reads the store
        assert layer.progress is None
        assert not info.keep_cache
        await fs.release(info.fh)
        await fs.release(writer.fh)
        assert fs.writers == {}


async def test_an_open_that_stat_ed_before_a_change_does_not_attach_the_old_identity(
        tmp_path: Path) -> None:
    fs, base = stack_fs(tmp_path)
    async with serving(fs) as (nursery, entry):
        # The base changes on the store before either open: both must probe it again.
        os.utime(base, ns=(0, os.stat(base).st_mtime_ns + 1_000_000_000))
        from scachefs import shadow
        gate = Gate(fs.workers, lambda fn: fn is shadow.probe_image)
        first = await spawn(nursery, lambda: fs.open(entry.nodeid, os.O_RDONLY, CTX))
        await gate.entered.wait()  # the first open has its stat and waits in its probe
        with open(base, "r+b") as f:  # grows on the store meanwhile
            f.seek(0, os.SEEK_END)
            f.write(b"\xb2" * MiB)
        second = await fs.open(entry.nodeid, os.O_RDONLY, CTX)
        gate.release.set()
        while not first:
            await trio.sleep(0.01)
        assert isinstance(first[0], Opened), first
        current = identity_of(os.stat(base))
        (layer,) = fs.layers.values()
        assert layer.identity == current
        assert layer.buffer.size == 5 * MiB
        for fh in (first[0].fh, second.fh):
            await fs.release(fh)


async def test_an_open_during_a_truncate_does_not_attach(tmp_path: Path) -> None:
    fs, base = stack_fs(tmp_path)
    async with serving(fs) as (nursery, entry):
        gate = Gate(fs.workers, lambda fn: getattr(fn, "__name__", "") == "work"
                    and "setattr" in fn.__qualname__)
        truncating = await spawn(nursery, lambda: fs.setattr(entry.nodeid,
                                                             SetAttr(size=2 * MiB), CTX))
        await gate.entered.wait()
        during = await fs.open(entry.nodeid, os.O_RDONLY, CTX)
        handle = fs.files[during.fh]
        assert isinstance(handle, LayerHandle) and handle.layer is None
        gate.release.set()
        while not truncating:
            await trio.sleep(0.01)
        assert not isinstance(truncating[0], BaseException), truncating
        after = await fs.open(entry.nodeid, os.O_RDONLY, CTX)
        (layer,) = fs.layers.values()
        assert layer.identity == identity_of(os.stat(base))
        assert layer.buffer.size == 2 * MiB
        for fh in (during.fh, after.fh):
            await fs.release(fh)


async def test_a_trace_save_keeps_the_layer_descriptor_open_until_it_is_done(
        tmp_path: Path) -> None:
    data = tmp_path / "layer"
    data.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    traces = tmp_path / "traces"
    traces.mkdir()
    opts = MountOptions(cache_size=8 * MiB, host_id="test")
    cache = ChunkCache(8 * MiB, opts.chunk_size)
    workers = WorkerPool(2)
    store = TraceStore(os.open(traces, os.O_RDONLY | os.O_DIRECTORY), "test")
    boots = Boots(store, cache, workers, opts, lambda: 0)
    st = os.stat(data)
    layer = Layer((st.st_dev, st.st_ino), identity_of(st), "layer", os.open(data, os.O_RDONLY))
    layer.trace_id = LayerId(fingerprint(layer.fd, st.st_size), st.st_size, st.st_mtime_ns)

    async def fill(offset: int, length: int) -> bytes:
        return os.pread(layer.fd, length, offset)

    layer.buffer = cache.layer(layer.identity, st.st_size, fill)
    session = BootSession(opts.chunk_size, st.st_size, now=0.0)
    for i in range(64):  # a boot whose chunks are not resident: digests read the store
        session.note(i * opts.chunk_size, 4096, now=i / 100)
    from scachefs import boots as boots_module
    gate = Gate(workers, lambda fn: fn is boots_module._digests_from_store)
    fd = layer.fd
    async with trio.open_nursery() as nursery:
        nursery.start_soon(boots._save, layer, session)
        await gate.entered.wait()
        layer.active = False  # the layer is dropped meanwhile (a writer opened it)
        layer.release_fd()
        os.fstat(fd)  # still ours: the save counts itself in fills
        assert layer.fd == fd
        gate.release.set()
    assert layer.fd == -1  # closed once the save was done with it
    assert any(name.endswith(".trace") for name in os.listdir(traces))
