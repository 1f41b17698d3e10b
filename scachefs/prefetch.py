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
from scachefs.traces import WorkingSet, plan_runs

log = logging.getLogger(__name__)

BUDGET_SHARE = 0.9  # pinned bytes may use at most this share of the budget
GAP_BYTES = 128 << 10  # a gap this small between wanted chunks is read to save a request


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


async def prefetch(cache: ChunkCache, buffer: LayerBuffer, working_set: WorkingSet,
                   progress: Progress, *, path: str, workers: int = 4, rate: int = 0,
                   demand_waiting: Callable[[], int]) -> None:
    """Read a working set into the cache; updates ``progress`` as it goes."""
    cs = cache.chunk_size
    runs = plan_runs(working_set.chunks, cs, buffer.size, max_bytes=cache.max_fill_bytes,
                     max_gap=max(1, GAP_BYTES // cs))
    wanted = set(working_set.chunks)
    cache.pin(buffer, wanted)
    start = time.monotonic()
    log.info("prefetch of %s started (%s): %d MiB in %d reads", path, progress.reason,
             progress.total_bytes >> 20, len(runs))
    queue = iter(runs)
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
                if xxhash.xxh3_64_intdigest(data) != working_set.digests.get(chunk):
                    # The layer changed since the trace was recorded: the prediction is
                    # stale (the bytes in the cache are the store's, so they are right).
                    progress.stale_chunks += 1
                    cache.unpin(buffer, [chunk])
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
