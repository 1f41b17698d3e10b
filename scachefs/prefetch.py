"""Prefetch: fill a layer's buffer with its boot working set ahead of the VMs.

The working set's chunks are read in first-access order as store reads of up to
1 MiB (small gaps filled), by a few parallel workers, through the cache's own
single-flight fill path: a VM that asks for a chunk being prefetched waits for
that read instead of issuing another. Demand comes first: workers pause while
demand misses are waiting. Prefetched chunks are pinned, up to the budget; when
the budget cannot hold the working set, prefetch stops there and says so. Each
prefetched chunk's xxh3 digest is compared with the trace's: a mismatch means
the layer changed since the trace was recorded (the bytes in the cache are the
store's, so they are right; the prediction is stale).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import trio
import xxhash

from scachefs.chunkcache import ChunkCache, LayerBuffer
from scachefs.traces import Check, WorkingSet, prefetch_plan

log = logging.getLogger(__name__)

BUDGET_SHARE = 0.9  # pinned bytes may use at most this share of the budget


@dataclasses.dataclass
class Progress:
    """What a prefetch did; shown by scachefs-stat."""

    reason: str
    total_bytes: int
    done_bytes: int = 0  # bytes of the working set resident so far
    fetched_bytes: int = 0  # bytes this prefetch read from the store
    requests: int = 0
    running: bool = True
    started: float = dataclasses.field(default_factory=time.time)
    seconds: float = 0.0
    stopped_at_budget: bool = False
    stale_chunks: int = 0
    prefetched: set[int] = dataclasses.field(default_factory=set)  # chunks it brought in
    useful: int = 0  # of those, chunks a VM read afterwards
    error: str | None = None

    def note_demand(self, first: int, last: int) -> None:
        """A VM read chunks first..last: count prefetched ones as useful (once each)."""
        prefetched = self.prefetched
        for chunk in range(first, last + 1):
            if chunk in prefetched:
                prefetched.discard(chunk)
                self.useful += 1

    def as_dict(self) -> dict[str, object]:
        brought = self.useful + len(self.prefetched)
        return {"reason": self.reason, "running": self.running,
                "total_bytes": self.total_bytes, "done_bytes": self.done_bytes,
                "fetched_bytes": self.fetched_bytes, "requests": self.requests,
                "seconds": round(self.seconds, 3), "stopped_at_budget": self.stopped_at_budget,
                "stale_chunks": self.stale_chunks, "prefetched_chunks": brought,
                "useful_chunks": self.useful, "wasted_chunks": len(self.prefetched),
                "useful_ratio": round(self.useful / brought, 4) if brought else None,
                "error": self.error}


def verify(cache: ChunkCache, buffer: LayerBuffer, check: Check) -> bool | None:
    """Whether a byte range still has the digest a trace saw; None if not all resident.

    For digests recorded at another chunk size than the cache's; synchronous (the
    arena's chunks are only valid until the next await).
    """
    offset, length, digest = check
    cs = cache.chunk_size
    h = xxhash.xxh3_64()
    got = 0
    for index in range(offset // cs, (offset + length - 1) // cs + 1):
        data = cache.peek(buffer, index)
        if data is None:
            return None
        lo = max(offset - index * cs, 0)
        hi = min(offset + length - index * cs, len(data))
        if hi > lo:
            h.update(memoryview(data)[lo:hi])
            got += hi - lo
    return got == length and h.intdigest() == digest


async def prefetch(cache: ChunkCache, buffer: LayerBuffer, working_set: WorkingSet,
                   progress: Progress, *, path: str, workers: int = 4, rate: int = 0,
                   demand_waiting: Callable[[], int]) -> None:
    """Read a working set into the cache; updates ``progress`` as it goes."""
    cs = cache.chunk_size
    runs = prefetch_plan(working_set.chunks, cs, buffer.size, max_bytes=cache.max_fill_bytes)
    wanted = set(working_set.chunks)
    cache.pin(buffer, wanted)
    start = time.monotonic()
    log.info("prefetch of %s started (%s): %d MiB in %d reads", path, progress.reason,
             progress.total_bytes >> 20, len(runs))
    queue = iter(runs)
    digests, checks = working_set.digests, working_set.checks
    pending: list[Check] = []

    def stale(check: Check) -> None:
        progress.stale_chunks += 1
        offset, length, _ = check
        cache.unpin(buffer, range(offset // cs, (offset + length - 1) // cs + 1))
    budget_limit = int(cache.budget_bytes * BUDGET_SHARE)

    async def worker() -> None:
        for offset, length, chunks in queue:
            while demand_waiting() > 0:  # demand misses go first
                await trio.sleep(0.002)
            if cache.pinned_bytes + length > budget_limit:
                progress.stopped_at_budget = True
                return
            missing = [c for c in chunks if not buffer.is_resident(c)]
            if missing:
                fetched = await cache.prefetch(buffer, offset, length)
                progress.fetched_bytes += fetched
                progress.requests += 1
                progress.prefetched.update(c for c in missing if c in wanted
                                           and buffer.is_resident(c))
            for chunk in chunks:
                if chunk not in wanted:
                    continue
                data = cache.peek(buffer, chunk)
                if data is None:
                    continue
                progress.done_bytes += len(data)
                expected = digests.get(chunk)
                if expected is not None and xxhash.xxh3_64_intdigest(data) != expected:
                    # The layer changed since the trace was recorded: the prediction is
                    # stale (the bytes in the cache are the store's, so they are right).
                    progress.stale_chunks += 1
                    cache.unpin(buffer, [chunk])
                for check in checks.get(chunk, ()):  # digests taken at another chunk size
                    verdict = verify(cache, buffer, check)
                    if verdict is None:
                        pending.append(check)  # a chunk it covers is still being read
                    elif not verdict:
                        stale(check)
            if progress.stale_chunks:
                return  # stop: the trace is stale, a fresh boot will be recorded
            if rate > 0:  # bandwidth cap: never ahead of rate bytes/s
                ahead = progress.fetched_bytes / rate - (time.monotonic() - start)
                if ahead > 0:
                    await trio.sleep(ahead)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(max(1, workers)):
                nursery.start_soon(worker)
    except* OSError as group:  # a trio nursery raises an ExceptionGroup, never OSError
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        progress.error = getattr(exc, "strerror", None) or str(exc)
        log.warning("prefetch of %s failed: %s", path, progress.error)
    finally:
        for check in pending:  # ranges whose chunks other workers were reading
            if verify(cache, buffer, check) is False:
                stale(check)
        progress.running = False
        progress.seconds = time.monotonic() - start
    if progress.stopped_at_budget:
        log.warning("prefetch of %s stopped at the cache budget (%d MiB pinned of %d MiB): "
                    "raise cache_size to hold the working sets", path,
                    cache.pinned_bytes >> 20, cache.budget_bytes >> 20)
    log.info("prefetch of %s finished: %d MiB of %d MiB resident, %d MiB read in %d requests "
             "in %.2f s%s", path, progress.done_bytes >> 20, progress.total_bytes >> 20,
             progress.fetched_bytes >> 20, progress.requests, progress.seconds,
             f", {progress.stale_chunks} stale chunks" if progress.stale_chunks else "")
