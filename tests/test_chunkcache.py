"""Tests for scachefs.chunkcache: hit path, coalescing, single flight, errors, budget, policies."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Hashable

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from scachefs.chunkcache import ChunkCache, LayerBuffer

KiB = 1024
MiB = 1024 * KiB


def pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating content so that misplaced bytes show up."""
    return random.Random(seed).randbytes(n)


class FakeStore:
    """A layer file in memory: counts fill calls, can fail, be short, slow or gated."""

    def __init__(self, data: bytes, delay: float = 0.0) -> None:
        self.data = data
        self.delay = delay
        self.rng: random.Random | None = None  # with jitter/fail_rate: random slowness, EIO
        self.jitter = 0.0
        self.fail_rate = 0.0
        self.calls: list[tuple[int, int]] = []
        self.fail_errno: int | None = None
        self.fail_at: set[int] = set()  # fail only fills starting at these offsets
        self.short = False
        self.gate: trio.Event | None = None

    async def fill(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        data = self.data  # what a pread issued now would see
        if self.delay:
            await trio.sleep(self.delay)
        if self.rng is not None:
            await trio.sleep(self.rng.random() * self.jitter)
            if self.rng.random() < self.fail_rate:
                raise OSError(errno.EIO, "injected")
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_errno is not None and (not self.fail_at or offset in self.fail_at):
            raise OSError(self.fail_errno, os.strerror(self.fail_errno))
        out = data[offset : offset + length]
        if self.short:
            out = out[: len(out) // 2]
        return out


def make(
    size: int,
    *,
    budget: int = 64 * MiB,
    chunk: int = 4096,
    max_fill: int = 1 * MiB,
    policy: str = "s3fifo",
    identity: Hashable = "base",
    seed: int = 0,
    delay: float = 0.0,
) -> tuple[ChunkCache, LayerBuffer, FakeStore]:
    cache = ChunkCache(budget, chunk_size=chunk, max_fill_bytes=max_fill, policy=policy)
    store = FakeStore(pattern(size, seed), delay)
    return cache, cache.layer(identity, size, store.fill), store


# ---------------------------------------------------------------- lookup / read


def test_lookup_miss_returns_none_and_counts_nothing() -> None:
    cache, layer, store = make(10 * 4096)
    assert cache.lookup(layer, 0, 4096) is None
    assert cache.lookup(layer, 5000, 100) is None
    assert layer.stats.hit_ops == layer.stats.miss_ops == 0
    assert cache.total.hit_ops == 0
    assert store.calls == []


SIZE = 5 * 4096 + 1234  # five full chunks and a partial sixth


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (0, 4096),  # exactly one chunk
        (100, 200),  # inside one chunk, unaligned
        (4000, 200),  # spans chunks 0-1, unaligned
        (0, SIZE),  # whole layer
        (1, 3 * 4096),  # spans four chunks, unaligned both ends
        (5 * 4096, 1234),  # exactly the last partial chunk
        (5 * 4096 + 1000, 4096),  # clamped at EOF inside the last chunk
        (4 * 4096 + 7, 10 * 4096),  # spans into the partial chunk, clamped
        (SIZE - 1, 1),  # last byte
    ],
)
@pytest.mark.parametrize("policy", ["s3fifo", "lru"])
@pytest.mark.trio
async def test_read_then_lookup_exact_bytes(offset: int, size: int, policy: str) -> None:
    cache, layer, store = make(SIZE, policy=policy)
    expected = store.data[offset : offset + size]
    assert await cache.read(layer, offset, size) == expected
    assert layer.stats.miss_ops == 1
    calls = len(store.calls)
    got = cache.lookup(layer, offset, size)
    assert got == expected
    assert isinstance(got, bytes)
    assert layer.stats.hit_ops == 1
    assert layer.stats.hit_bytes == len(expected)
    assert await cache.read(layer, offset, size) == expected
    assert len(store.calls) == calls  # the second read was a hit
    assert cache.total.hit_ops == 2
    pieces = cache.lookup_pieces(layer, offset, size)  # the same bytes, for one writev
    assert pieces is not None and b"".join(pieces) == expected
    assert cache.total.hit_ops == 3 and layer.stats.hit_bytes == 3 * len(expected)


@pytest.mark.trio
async def test_past_eof_and_empty_reads() -> None:
    cache, layer, store = make(SIZE)
    assert cache.lookup(layer, SIZE, 100) == b""
    assert cache.lookup(layer, SIZE + 5000, 100) == b""
    assert await cache.read(layer, SIZE + 1, 4096) == b""
    assert await cache.read(layer, 100, 0) == b""
    assert store.calls == []
    with pytest.raises(ValueError):
        cache.lookup(layer, -1, 10)
    with pytest.raises(ValueError):
        await cache.read(layer, 0, -1)


@pytest.mark.trio
async def test_lookup_needs_every_chunk_resident() -> None:
    cache, layer, _ = make(SIZE)
    await cache.read(layer, 0, 4096)
    await cache.read(layer, 2 * 4096, 4096)
    assert cache.lookup(layer, 0, 3 * 4096) is None  # chunk 1 missing
    assert cache.lookup(layer, 4090, 10) is None
    assert layer.stats.hit_ops == 0


@pytest.mark.trio
async def test_last_chunk_fill_is_clamped_at_eof() -> None:
    cache, layer, store = make(SIZE)
    await cache.read(layer, 5 * 4096 + 10, 100)
    assert store.calls == [(5 * 4096, 1234)]
    assert layer.resident_bytes == 1234
    assert cache.used_bytes == 1234


# ------------------------------------------------------------------- coalescing


@pytest.mark.trio
async def test_contiguous_misses_are_one_fill() -> None:
    cache, layer, store = make(8 * MiB, chunk=64 * KiB)
    assert await cache.read(layer, 0, 1 * MiB) == store.data[: 1 * MiB]
    assert store.calls == [(0, 1 * MiB)]
    assert layer.stats.store_read_hist == {1 * MiB: 1}


@pytest.mark.trio
async def test_long_read_split_at_max_fill_bytes() -> None:
    cache, layer, store = make(8 * MiB, chunk=64 * KiB)
    n = 5 * MiB // 2
    assert await cache.read(layer, 0, n) == store.data[:n]
    assert sorted(store.calls) == [(0, MiB), (MiB, MiB), (2 * MiB, MiB // 2)]
    assert layer.stats.store_reads == 3
    assert layer.stats.store_bytes == n
    assert layer.stats.store_read_hist == {MiB: 2, MiB // 2: 1}


@pytest.mark.trio
async def test_runs_split_around_resident_chunks() -> None:
    cache, layer, store = make(SIZE * 4)
    await cache.read(layer, 3 * 4096, 1)
    await cache.read(layer, 7 * 4096, 1)
    store.calls.clear()
    assert await cache.read(layer, 0, 10 * 4096) == store.data[: 10 * 4096]
    assert sorted(store.calls) == [(0, 3 * 4096), (4 * 4096, 3 * 4096), (8 * 4096, 2 * 4096)]


@pytest.mark.trio
async def test_unaligned_cold_read_fills_whole_chunks() -> None:
    cache, layer, store = make(SIZE)
    assert await cache.read(layer, 4000, 5000) == store.data[4000:9000]
    assert store.calls == [(0, 3 * 4096)]
    assert cache.lookup(layer, 0, 3 * 4096) == store.data[: 3 * 4096]


# ------------------------------------------------------------------ single flight


@pytest.mark.trio
async def test_64_concurrent_readers_one_fill(autojump_clock: trio.abc.Clock) -> None:
    cache, layer, store = make(SIZE, delay=1.0)
    results: list[bytes] = []

    async def reader(i: int) -> None:
        results.append(await cache.read(layer, 100 + i, 50))

    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(reader, i)
    assert store.calls == [(0, 4096)]
    assert sorted(results) == sorted(store.data[100 + i : 150 + i] for i in range(64))
    assert layer.stats.singleflight_joins == 63
    assert layer.stats.miss_ops == 64
    assert layer.stats.store_reads == 1


@pytest.mark.trio
async def test_overlapping_ranges_share_fills(autojump_clock: trio.abc.Clock) -> None:
    cache, layer, store = make(SIZE * 4, delay=1.0)
    got: dict[str, bytes] = {}

    async def read(name: str, offset: int, size: int) -> None:
        got[name] = await cache.read(layer, offset, size)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, "a", 0, 4 * 4096)  # chunks 0-3
        await trio.sleep(0.1)
        nursery.start_soon(read, "b", 2 * 4096 + 5, 4 * 4096)  # chunks 2-6
        await trio.sleep(0.1)
        nursery.start_soon(read, "c", 1, 7 * 4096)  # chunks 0-7
    assert got["a"] == store.data[: 4 * 4096]
    assert got["b"] == store.data[2 * 4096 + 5 : 6 * 4096 + 5]
    assert got["c"] == store.data[1 : 7 * 4096 + 1]
    # Every chunk was read from the store exactly once.
    assert sorted(store.calls) == [(0, 4 * 4096), (4 * 4096, 3 * 4096), (7 * 4096, 4096)]
    assert layer.stats.store_bytes == 8 * 4096
    assert layer.stats.singleflight_joins == 3  # b joins a; c joins a and b


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOENT, errno.ESTALE])
@pytest.mark.trio
async def test_failed_fill_wakes_all_waiters_and_caches_nothing(
    err: int, autojump_clock: trio.abc.Clock
) -> None:
    cache, layer, store = make(SIZE, delay=1.0)
    store.fail_errno = err
    errnos: list[int | None] = []

    async def reader() -> None:
        try:
            await cache.read(layer, 0, 2 * 4096)
        except OSError as exc:
            errnos.append(exc.errno)

    with trio.fail_after(100):  # a livelock fails instead of hanging
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(reader)
    assert errnos == [err] * 10
    assert len(store.calls) == 1
    assert layer.stats.fill_errors == 1
    assert cache.used_bytes == 0 and layer.resident_bytes == 0
    assert layer._inflight == {}
    assert cache.lookup(layer, 0, 4096) is None
    cache.check_invariants()

    store.fail_errno = None
    assert await cache.read(layer, 0, 2 * 4096) == store.data[: 2 * 4096]
    assert len(store.calls) == 2
    assert cache.lookup(layer, 0, 2 * 4096) == store.data[: 2 * 4096]


@pytest.mark.trio
async def test_short_fill_is_eio_and_not_cached(autojump_clock: trio.abc.Clock) -> None:
    cache, layer, store = make(SIZE, delay=1.0)
    store.short = True
    errnos: list[int | None] = []

    async def reader() -> None:
        try:
            await cache.read(layer, 0, 4096)
        except OSError as exc:
            errnos.append(exc.errno)

    with trio.fail_after(100):  # a livelock fails instead of hanging
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(reader)
    assert errnos == [errno.EIO] * 5
    assert cache.used_bytes == 0
    assert len(store.calls) == 1
    store.short = False
    assert await cache.read(layer, 0, 4096) == store.data[:4096]


@pytest.mark.trio
async def test_one_failed_run_does_not_poison_the_others() -> None:
    cache, layer, store = make(SIZE * 4, max_fill=2 * 4096)
    store.fail_errno = errno.EIO
    store.fail_at = {2 * 4096}
    with pytest.raises(OSError) as info:
        await cache.read(layer, 0, 6 * 4096)
    assert info.value.errno == errno.EIO
    assert len(store.calls) == 3
    resident = [i for i in range(6) if layer.is_resident(i)]
    assert resident == [0, 1, 4, 5]
    store.fail_at = set()
    store.fail_errno = None
    store.calls.clear()
    assert await cache.read(layer, 0, 6 * 4096) == store.data[: 6 * 4096]
    assert store.calls == [(2 * 4096, 2 * 4096)]


@pytest.mark.trio
async def test_cancelled_filler_hands_over_to_waiter(autojump_clock: trio.abc.Clock) -> None:
    cache, layer, store = make(SIZE, delay=10.0)
    got: list[bytes] = []

    async def waiter() -> None:
        got.append(await cache.read(layer, 0, 4096))

    with trio.fail_after(100):  # a livelock fails instead of hanging
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(1.0):
                nursery.start_soon(waiter)
                await cache.read(layer, 0, 4096)  # owns the fill, then is cancelled
            assert got == []
    assert got == [store.data[:4096]]
    assert len(store.calls) == 2  # the waiter had to issue its own fill
    assert layer._inflight == {}
    cache.check_invariants()


# ------------------------------------------------------------------------ budget


@pytest.mark.parametrize("policy", ["s3fifo", "lru"])
@pytest.mark.trio
async def test_read_larger_than_budget_still_returns_data(policy: str) -> None:
    cache, layer, store = make(SIZE * 4, budget=2 * 4096 + 100, policy=policy)
    assert await cache.read(layer, 10, 15 * 4096) == store.data[10 : 15 * 4096 + 10]
    assert cache.used_bytes <= cache.budget_bytes
    assert cache.used_bytes == 2 * 4096
    assert layer.stats.evictions > 0
    cache.check_invariants()


@pytest.mark.trio
async def test_zero_budget_caches_nothing() -> None:
    cache, layer, store = make(SIZE, budget=0)
    assert await cache.read(layer, 0, SIZE) == store.data
    assert await cache.read(layer, 0, SIZE) == store.data
    assert cache.used_bytes == 0
    assert len(store.calls) == 2


LAYER_SIZES = (10 * 256 + 17, 7 * 256, 3 * 256 + 1)
OPS = st.sampled_from(["read", "read", "read", "lookup", "prefetch", "pin", "unpin", "drop"])


@settings(max_examples=150, deadline=None)
@given(
    policy=st.sampled_from(["s3fifo", "lru"]),
    budget=st.integers(0, 14 * 256),
    ops=st.lists(
        st.tuples(OPS, st.integers(0, 2), st.integers(0, 11 * 256), st.integers(0, 6 * 256)),
        max_size=60,
    ),
)
def test_budget_never_exceeded_random_ops(
    policy: str, budget: int, ops: list[tuple[str, int, int, int]]
) -> None:
    """Any sequence of operations keeps the accounting exact and the bytes right."""

    async def run() -> None:
        cache = ChunkCache(budget, chunk_size=256, max_fill_bytes=3 * 256, policy=policy)
        stores = [FakeStore(pattern(n, seed=i)) for i, n in enumerate(LAYER_SIZES)]
        layers = [cache.layer(i, len(s.data), s.fill) for i, s in enumerate(stores)]
        for op, which, offset, size in ops:
            layer, data = layers[which], stores[which].data
            if op == "read":
                assert await cache.read(layer, offset, size) == data[offset : offset + size]
            elif op == "lookup":
                got = cache.lookup(layer, offset, size)
                assert got is None or got == data[offset : offset + size]
            elif op == "prefetch":
                await cache.prefetch(layer, offset, size)
            elif op == "pin":
                cache.pin(layer, range(offset // 256, (offset + size) // 256 + 1))
            elif op == "unpin":
                cache.unpin(layer, range(offset // 256, (offset + size) // 256 + 1))
            else:
                cache.drop_layer(which)
            cache.check_invariants()
            assert cache.used_bytes <= budget

    trio.run(run)


@pytest.mark.parametrize("policy", ["s3fifo", "lru"])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.trio
async def test_budget_never_exceeded_concurrent(
    policy: str, seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """Many concurrent readers with slow, sometimes failing fills, checked continuously."""
    rng = random.Random(seed)
    cs = 1024
    budget = 20 * cs + 300
    cache = ChunkCache(budget, chunk_size=cs, max_fill_bytes=4 * cs, policy=policy)
    sizes = [64 * cs + 5, 40 * cs, 9 * cs + 1000]
    stores = [FakeStore(pattern(n, seed=i)) for i, n in enumerate(sizes)]
    layers = [cache.layer(i, len(s.data), s.fill) for i, s in enumerate(stores)]
    for store in stores:
        store.rng, store.jitter, store.fail_rate = rng, 0.01, 0.05
    done = trio.Event()

    async def checker() -> None:
        while not done.is_set():
            cache.check_invariants()
            await trio.sleep(0.0005)

    async def worker() -> None:
        for _ in range(60):
            which = rng.randrange(3)
            layer, data = layers[which], stores[which].data
            offset = rng.randrange(sizes[which] + cs)
            size = rng.choice([1, 512, cs, 3 * cs, 8 * cs, 30 * cs])
            roll = rng.random()
            try:
                if roll < 0.8:
                    got = await cache.read(layer, offset, size)
                    assert got == data[offset : offset + size]
                elif roll < 0.9:
                    await cache.prefetch(layer, offset, size)
                elif roll < 0.95:
                    cache.pin(layer, range(offset // cs, offset // cs + 2))
                elif roll < 0.98:
                    cache.unpin_all(layer)
                else:
                    cache.drop_layer(which)
            except OSError as exc:
                assert exc.errno == errno.EIO
            cache.check_invariants()
            await trio.sleep(rng.random() * 0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(checker)
        async with trio.open_nursery() as workers:
            for _ in range(24):
                workers.start_soon(worker)
        done.set()
    cache.check_invariants()
    assert cache.total.store_reads > 0
    assert all(not layer._inflight for layer in layers)


# ------------------------------------------------------------------------- pins


@pytest.mark.parametrize("policy", ["s3fifo", "lru"])
@pytest.mark.trio
async def test_pinned_chunks_survive_pressure(policy: str) -> None:
    cache, base, store = make(SIZE * 8, budget=16 * 4096, policy=policy)
    other = FakeStore(pattern(400 * 4096, seed=9))
    scan = cache.layer("scan", 400 * 4096, other.fill)
    await cache.read(base, 0, 4 * 4096)  # resident, then pinned
    cache.pin(base, [0, 1, 2, 3, 10, 11])  # 10 and 11 are pinned before they are filled
    await cache.read(base, 10 * 4096, 2 * 4096)
    assert cache.pinned_bytes == 6 * 4096
    for off in range(0, 400 * 4096, 4096):
        await cache.read(scan, off, 4096)
        assert cache.used_bytes <= cache.budget_bytes
    assert all(base.is_resident(i) for i in [0, 1, 2, 3, 10, 11])
    assert base.stats.evictions == 0
    assert scan.stats.evictions > 0
    calls = len(store.calls)
    assert await cache.read(base, 0, 4 * 4096) == store.data[: 4 * 4096]
    assert len(store.calls) == calls
    cache.unpin_all(base)
    assert cache.pinned_bytes == 0
    for off in range(0, 400 * 4096, 4096):  # read twice: hot enough to reach S3-FIFO's main
        await cache.read(scan, off, 4096)
        await cache.read(scan, off, 4096)
    assert not any(base.is_resident(i) for i in [0, 1, 2, 3, 10, 11])
    cache.check_invariants()


@pytest.mark.trio
async def test_everything_pinned_still_serves_reads() -> None:
    cache, layer, store = make(SIZE * 8, budget=4 * 4096)
    cache.pin(layer, range(4))
    await cache.read(layer, 0, 4 * 4096)
    assert cache.used_bytes == 4 * 4096 == cache.pinned_bytes
    for off in range(4 * 4096, 20 * 4096, 4096):
        assert await cache.read(layer, off, 4096) == store.data[off : off + 4096]
        assert cache.used_bytes == 4 * 4096
    assert all(layer.is_resident(i) for i in range(4))
    cache.check_invariants()


# ------------------------------------------------------------------- drop_layer


@pytest.mark.trio
async def test_drop_during_inflight_fill_does_not_resurrect() -> None:
    cache, layer, store = make(SIZE)
    old = store.data
    store.gate = trio.Event()
    got: dict[str, bytes] = {}

    async def read(name: str) -> None:
        got[name] = await cache.read(layer, 0, 4096)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, "before")
        await trio.testing.wait_all_tasks_blocked()
        assert len(store.calls) == 1
        cache.drop_layer("base")
        store.data = pattern(SIZE, seed=42)  # the layer was rewritten
        gate, store.gate = store.gate, None
        # A reader arriving after the drop must not join the stale fill.
        nursery.start_soon(read, "after")
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert got["before"] == old[:4096]  # the waiter still gets its bytes
    assert got["after"] == store.data[:4096]
    assert len(store.calls) == 2
    assert cache.lookup(layer, 0, 4096) == store.data[:4096]
    assert layer.resident_bytes == cache.used_bytes == 4096
    cache.check_invariants()


@pytest.mark.trio
async def test_fill_finishing_after_drop_is_not_cached() -> None:
    cache, layer, store = make(SIZE)
    store.gate = trio.Event()
    got: list[bytes] = []

    async def read() -> None:
        got.append(await cache.read(layer, 0, 2 * 4096))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        cache.drop_layer("base")
        store.gate.set()
    assert got == [store.data[: 2 * 4096]]
    assert cache.lookup(layer, 0, 1) is None
    assert layer.resident_bytes == cache.used_bytes == 0
    cache.check_invariants()


@pytest.mark.trio
async def test_drop_layer_forgets_chunks() -> None:
    cache, layer, _ = make(SIZE)
    await cache.read(layer, 0, SIZE)
    assert cache.used_bytes == SIZE
    cache.drop_layer("base")
    assert cache.used_bytes == 0 and layer.resident_bytes == 0
    assert cache.lookup(layer, 0, 10) is None
    cache.drop_layer("missing")  # unknown identity: no-op
    cache.check_invariants()


@pytest.mark.trio
async def test_forget_allows_new_size_and_detaches_old_buffer() -> None:
    cache, layer, store = make(SIZE)
    await cache.read(layer, 0, 4096)
    cache.drop_layer("base", forget=True)
    assert layer not in list(cache.layers())
    bigger = FakeStore(pattern(2 * SIZE, seed=5))
    fresh = cache.layer("base", 2 * SIZE, bigger.fill)
    assert fresh is not layer
    # The stale buffer still reads but caches nothing.
    assert await cache.read(layer, 0, 4096) == store.data[:4096]
    assert not layer.attached and layer.resident_bytes == 0
    assert await cache.read(fresh, 6 * 4096, 4096) == bigger.data[6 * 4096 : 7 * 4096]
    assert cache.used_bytes == fresh.resident_bytes == 4096
    cache.check_invariants()


def test_layer_get_or_create_and_size_mismatch() -> None:
    cache = ChunkCache(MiB)
    store = FakeStore(b"x" * 100)
    a = cache.layer(("dev", 1), 100, store.fill)
    assert cache.layer(("dev", 1), 100, store.fill) is a
    with pytest.raises(ValueError):
        cache.layer(("dev", 1), 101, store.fill)
    b = cache.layer(("dev", 2), 50, store.fill)
    assert {x.identity for x in cache.layers()} == {("dev", 1), ("dev", 2)}
    assert b.size == 50


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ChunkCache(MiB, policy="arc")
    with pytest.raises(ValueError):
        ChunkCache(MiB, chunk_size=0)
    with pytest.raises(ValueError):
        ChunkCache(-1)


# ------------------------------------------------------------------- prefetch


@pytest.mark.trio
async def test_prefetch_fills_without_counting_reader_stats() -> None:
    cache, layer, store = make(SIZE * 4)
    assert await cache.prefetch(layer, 100, 5 * 4096) == 6 * 4096
    assert layer.stats.hit_ops == layer.stats.miss_ops == 0
    assert layer.stats.store_reads == 1
    assert await cache.prefetch(layer, 0, 6 * 4096) == 0
    assert await cache.prefetch(layer, 4 * SIZE, 4096) == 0
    assert cache.lookup(layer, 0, 6 * 4096) == store.data[: 6 * 4096]
    store.fail_errno = errno.EIO
    with pytest.raises(OSError):
        await cache.prefetch(layer, 6 * 4096, 4096)


# ----------------------------------------------------------------- policies


async def _scan_with_working_set(policy: str) -> tuple[ChunkCache, LayerBuffer, int]:
    """Warm a 20-chunk working set, then scan 1000 chunks (10x the budget) of another
    layer, re-reading the working set every 200 scan chunks. Returns the misses the
    working-set re-reads took."""
    cs = 4096
    cache = ChunkCache(100 * cs, chunk_size=cs, policy=policy)
    ws_store = FakeStore(pattern(20 * cs, seed=1))
    scan_store = FakeStore(pattern(1000 * cs, seed=2))
    ws = cache.layer("ws", 20 * cs, ws_store.fill)
    scan = cache.layer("scan", 1000 * cs, scan_store.fill)
    for _ in range(3):
        for i in range(20):
            await cache.read(ws, i * cs, cs)
    misses = 0
    for start in range(0, 1000, 4):
        await cache.read(scan, start * cs, 4 * cs)
        if start % 200 == 196:
            for i in range(20):
                if cache.lookup(ws, i * cs, cs) is None:
                    misses += 1
                    await cache.read(ws, i * cs, cs)
        assert cache.used_bytes <= cache.budget_bytes
    return cache, ws, misses


@pytest.mark.trio
async def test_s3fifo_keeps_working_set_through_scan() -> None:
    cache, ws, misses = await _scan_with_working_set("s3fifo")
    assert misses == 0
    assert all(ws.is_resident(i) for i in range(20))
    assert ws.stats.evictions == 0
    cache.check_invariants()


@pytest.mark.trio
async def test_lru_loses_working_set_to_scan() -> None:
    cache, ws, misses = await _scan_with_working_set("lru")
    assert misses == 5 * 20  # every periodic re-read missed
    assert ws.stats.evictions >= 100
    cache.check_invariants()


@pytest.mark.trio
async def test_s3fifo_ghost_readmits_to_main() -> None:
    """A chunk evicted from the small queue unread and then read again goes to main."""
    cs = 1024
    cache = ChunkCache(10 * cs, chunk_size=cs, policy="s3fifo")
    store = FakeStore(pattern(100 * cs))
    layer = cache.layer("l", 100 * cs, store.fill)
    for i in range(11):  # chunk 0 falls out of the small queue into the ghost
        await cache.read(layer, i * cs, cs)
    assert not layer.is_resident(0)
    await cache.read(layer, 0, cs)  # ghost hit -> main
    for i in range(20, 60):  # a scan only churns the small queue
        await cache.read(layer, i * cs, cs)
    assert layer.is_resident(0)
    cache.check_invariants()


@pytest.mark.trio
async def test_a_miss_reads_the_aligned_window_around_it() -> None:
    data = bytes(range(256)) * 1024  # 256 KiB
    calls: list[tuple[int, int]] = []

    async def fill(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        return data[offset:offset + length]

    cache = ChunkCache(1 << 20, chunk_size=16384, miss_window=65536)
    layer = cache.layer("w", len(data), fill)
    assert await cache.read(layer, 70000, 100) == data[70000:70100]
    assert calls == [(65536, 65536)]  # the whole aligned 64 KiB window, one store read
    assert cache.lookup(layer, 65536, 65536) == data[65536:131072]  # now all hits
    assert await cache.read(layer, len(data) - 10, 100) == data[-10:]  # clamped at EOF
    assert calls[-1] == (196608, 65536)


@pytest.mark.trio
async def test_arena_chunks_are_adopted_by_a_successor_and_checked() -> None:
    """Chunks in an arena outlive the cache that put them there; a successor adopts
    those whose header and digest check out, and drops the rest (never wrong bytes)."""
    import os

    from scachefs.arena import Arena, create_memfd, slots_for

    size, cs, budget = 40 * 4096 + 100, 4096, 1 * MiB
    fd = create_memfd(cs, budget)
    try:
        first = ChunkCache(budget, cs, arena=Arena(fd, cs, slots_for(cs, budget)))
        store = FakeStore(pattern(size))
        identity = (1, 2, size, 3)
        layer = first.layer(identity, size, store.fill)
        assert await first.read(layer, 0, size) == store.data
        arena = Arena(fd, cs, slots_for(cs, budget))
        # A torn write: the daemon died while it copied chunk 5 into its slot.
        slot5 = layer._slots[5]
        arena.view(slot5, 10)[:] = b"\0" * 10
        second = ChunkCache(budget, cs, arena=arena)
        assert second.restored_bytes == size - 4096  # all but chunk 5
        again = second.layer(identity, size, store.fill)
        calls = len(store.calls)
        assert again.resident_chunks == 40
        assert await second.read(again, 0, size) == store.data  # chunk 5 from the store
        assert len(store.calls) == calls + 1
        second.check_invariants()
        other = ChunkCache(budget, 8192, arena=Arena(fd, 8192, slots_for(8192, budget)))
        assert other.restored_bytes == 0  # another geometry: cold, never misread
    finally:
        os.close(fd)
