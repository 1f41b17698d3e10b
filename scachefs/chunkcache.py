"""One memory budget shared by the backing layers of every image stack.

Each layer (identified by an opaque hashable the caller chooses) gets a buffer of
fixed-size chunks.  Readers first try :meth:`ChunkCache.lookup`, a synchronous,
allocation-light memory path; on a miss they call :meth:`ChunkCache.read`, which
fills the missing chunks through the layer's ``fill`` callable.  The cache never
does I/O itself: ``fill`` is supplied by the caller (it runs ``pread`` in a worker
thread), so this module is pure logic plus trio and can be tested without FUSE.

Guarantees the rest of scachefs relies on:

* single flight: a chunk is read from the store by at most one fill at a time;
  every other reader of it waits for that fill (a boot storm costs one read);
* ``used_bytes <= budget_bytes`` at every instant; data a fill returns always
  reaches its readers even when it cannot be cached;
* a failed or short fill caches nothing and every waiter gets the same errno (a
  short one raises :class:`ShortFill`: the layer shrank on the store);
* a fill that started before the layer's ``trusted_at`` (its identity was too
  fresh to rule out a write still landing under it) serves its readers but
  caches nothing;
* :meth:`ChunkCache.drop_layer` bumps the layer generation, so fills that were
  in flight when the layer changed never insert stale data afterwards.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field

import trio

from scachefs.arena import Arena, Restored
from scachefs.eviction import POLICIES, EvictionPolicy, make_policy

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "POLICIES",
    "ChunkCache",
    "Fill",
    "LayerBuffer",
    "LayerStats",
    "ShortFill",
]

Fill = Callable[[int, int], Awaitable[bytes]]
"""``fill(offset, length) -> bytes`` read from the store; raises OSError on failure."""

DEFAULT_CHUNK_SIZE = 65536


class ShortFill(OSError):
    """The store returned fewer bytes than the layer's size promised: it shrank."""


async def _dormant_fill(offset: int, length: int) -> bytes:
    """The fill of a buffer adopted from the arena before its layer was opened again."""
    raise OSError(errno.ESTALE, "no open file for this layer")


def _size_bucket(length: int) -> int:
    """Round a request size up to a power of two, for the store-read histogram."""
    return 1 << max(0, (length - 1).bit_length())


@dataclass(slots=True)
class LayerStats:
    """Plain counters, cheap to bump on every request (one per layer plus a total)."""

    hit_ops: int = 0
    hit_bytes: int = 0
    miss_ops: int = 0
    miss_bytes: int = 0  # bytes returned by reads that missed (waited for a fill)
    store_reads: int = 0
    store_bytes: int = 0
    singleflight_joins: int = 0
    evictions: int = 0
    fill_errors: int = 0
    store_read_hist: dict[int, int] = field(default_factory=dict)

    def hit_ratio(self) -> float:
        """Fraction of read ops served entirely from memory (0.0 when idle)."""
        ops = self.hit_ops + self.miss_ops
        return self.hit_ops / ops if ops else 0.0


class LayerBuffer:
    """The resident chunks of one layer plus the bookkeeping to fill them.

    Only :class:`ChunkCache` mutates the private fields; callers read
    ``identity``, ``size``, ``stats`` and ``resident_bytes``, and may replace
    ``fill`` (e.g. after reopening the layer file).
    """

    __slots__ = (
        "_attached",
        "_chunks",
        "_generation",
        "_inflight",
        "_pinned",
        "_resident",
        "_slots",
        "fill",
        "freq",
        "identity",
        "size",
        "stats",
        "trusted_at",
    )

    def __init__(self, identity: Hashable, size: int, fill: Fill,
                 trusted_at: float = float("-inf")) -> None:
        self.identity = identity
        self.size = size
        self.fill = fill
        # trio time from which fills may be cached: before it, a write to the file may
        # still be landing under this identity (its mtime is set before the data).
        self.trusted_at = trusted_at
        self.stats = LayerStats()
        self._chunks: dict[int, bytes | memoryview] = {}
        self._slots: dict[int, int] = {}  # chunk -> arena slot (with an arena)
        self.freq: dict[int, int] = {}  # the eviction policy's counters (S3-FIFO)
        self._inflight: dict[int, _Flight] = {}
        self._pinned: set[int] = set()
        self._resident = 0
        self._generation = 0
        self._attached = True

    @property
    def resident_bytes(self) -> int:
        """Bytes of this layer held in memory (derived, kept in step with the chunks)."""
        return self._resident

    @property
    def resident_chunks(self) -> int:
        """Number of chunks of this layer held in memory."""
        return len(self._chunks)

    @property
    def pinned_chunks(self) -> frozenset[int]:
        """Chunk indices pinned (resident or not yet)."""
        return frozenset(self._pinned)

    @property
    def attached(self) -> bool:
        """False once the layer was forgotten: its reads still work but are not cached."""
        return self._attached

    def is_resident(self, chunk_index: int) -> bool:
        """Whether a chunk is in memory (for tests and the stat tool; not a hit)."""
        return chunk_index in self._chunks

    def __repr__(self) -> str:
        return (
            f"LayerBuffer(identity={self.identity!r}, size={self.size}, "
            f"resident_bytes={self._resident}, generation={self._generation})"
        )


class _Flight:
    """One in-progress fill of a run of contiguous chunks; waiters share its result."""

    __slots__ = ("data", "error", "event", "first", "generation", "last", "layer", "length",
                 "started")

    def __init__(self, layer: LayerBuffer, first: int, last: int, length: int) -> None:
        self.layer = layer
        self.first = first
        self.last = last
        self.length = length
        self.generation = layer._generation
        self.started = trio.current_time()
        self.event = trio.Event()
        self.data: bytes | None = None
        self.error: OSError | None = None

    def chunk(self, index: int, chunk_size: int) -> memoryview:
        """Zero-copy view of one chunk of the fill result (only after success)."""
        assert self.data is not None
        start = (index - self.first) * chunk_size
        return memoryview(self.data)[start : start + chunk_size]


def _join(pieces: list[bytes | memoryview], head: int, tail: int) -> bytes:
    """Concatenate chunk pieces, skipping ``head`` bytes of the first and keeping
    ``tail`` bytes of the last: the one copy a multi-chunk read makes."""
    first = pieces[0]
    if len(pieces) == 1:
        if head == 0 and tail == len(first) and isinstance(first, bytes):
            return first
        return bytes(first[head:tail])
    if head:
        pieces[0] = memoryview(first)[head:]
    last = pieces[-1]
    if tail != len(last):
        pieces[-1] = memoryview(last)[:tail]
    return b"".join(pieces)


class ChunkCache:
    """Chunk buffers of all layers under one byte budget and one eviction policy."""

    def __init__(
        self,
        budget_bytes: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_fill_bytes: int = 1 << 20,
        policy: str = "s3fifo",
        miss_window: int = 0,
        pin_limit: int | None = None,
        arena: Arena | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, not {budget_bytes}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, not {chunk_size}")
        if max_fill_bytes <= 0:
            raise ValueError(f"max_fill_bytes must be > 0, not {max_fill_bytes}")
        self._budget = budget_bytes
        # Pinned bytes never exceed this, so other layers always keep room to cache.
        self.pin_limit = budget_bytes if pin_limit is None else min(pin_limit, budget_bytes)
        self.chunk_size = chunk_size
        self.max_fill_bytes = max_fill_bytes
        self.policy = policy
        # A run is at least one chunk even if max_fill_bytes is smaller.
        self._max_run = max(1, max_fill_bytes // chunk_size)
        # Chunks a demand miss reads at least (aligned), within one run.
        self._window = min(self._max_run, max(1, miss_window // chunk_size))
        self._policy: EvictionPolicy[LayerBuffer] = make_policy(policy, budget_bytes, chunk_size)
        self.total = LayerStats()
        self._layers: dict[Hashable, LayerBuffer] = {}
        # With an arena, chunks live in its shared memory (they outlive the daemon),
        # and what a predecessor left there is adopted at once (see _adopt).
        self.arena = arena
        self._used = 0
        self._pinned_bytes = 0
        self.restored_bytes = self._adopt(arena.scan()) if arena is not None else 0

    # ------------------------------------------------------------------ layers

    @property
    def budget_bytes(self) -> int:
        """The memory budget (read-only: S3-FIFO's queue sizes derive from it)."""
        return self._budget

    @property
    def used_bytes(self) -> int:
        """Sum of the lengths of all resident chunks; never above ``budget_bytes``."""
        return self._used

    @property
    def pinned_bytes(self) -> int:
        """Resident bytes that eviction may not touch."""
        return self._pinned_bytes

    def layers(self) -> Iterator[LayerBuffer]:
        """The attached layer buffers (a snapshot, safe to iterate across awaits)."""
        return iter(list(self._layers.values()))

    def get_layer(self, identity: Hashable) -> LayerBuffer | None:
        """The buffer for ``identity`` if one is attached, without creating it."""
        return self._layers.get(identity)

    def layer(self, identity: Hashable, size: int, fill: Fill,
              trusted_at: float = float("-inf")) -> LayerBuffer:
        """Get or create the buffer of a layer.

        ``trusted_at`` (trio time) is when the identity became safe to cache under
        (see LayerBuffer.trusted_at); an existing buffer keeps the earlier of the two.
        An existing buffer keeps its ``fill``; a different ``size`` means the
        caller's view of the layer changed, which must go through
        ``drop_layer(identity, forget=True)`` first, hence ValueError.
        """
        if size < 0:
            raise ValueError(f"layer size must be >= 0, not {size}")
        buf = self._layers.get(identity)
        if buf is not None:
            if buf.fill is _dormant_fill:  # chunks a predecessor left: now they have a file
                buf.fill = fill
            buf.trusted_at = min(buf.trusted_at, trusted_at)
            if buf.size != size:
                raise ValueError(
                    f"layer {identity!r} is cached with size {buf.size}, not {size}; "
                    "drop_layer(identity, forget=True) it first"
                )
            return buf
        buf = LayerBuffer(identity, size, fill, trusted_at)
        self._layers[identity] = buf
        return buf

    def _adopt(self, restored: Restored) -> int:
        """Take back every chunk a predecessor left in the arena (checked by its scan).

        Each becomes an ordinary resident chunk of a buffer keyed by its identity, so
        every slot has exactly one owner from the start: the layer finds its chunks
        when it is opened again (its identity unchanged), and chunks of layers that
        changed or are gone are evicted like any other. Returns the bytes adopted.
        """
        arena = self.arena
        assert arena is not None
        adopted = 0
        for identity, chunks in restored.items():
            size = identity[2]
            buf = LayerBuffer(identity, size, _dormant_fill)
            for index, (slot, length) in sorted(chunks.items()):
                expected = min(self.chunk_size, size - index * self.chunk_size)
                if length != expected or self._used + length > self._budget:
                    arena.free(slot)
                    continue
                buf._chunks[index] = arena.view(slot, length)
                buf._slots[index] = slot
                buf._resident += length
                self._used += length
                self._policy.insert(buf, index, length)
            if buf._chunks:
                self._layers[identity] = buf
                adopted += buf._resident
        return adopted

    def drop_layer(self, identity: Hashable, *, forget: bool = False) -> None:
        """Forget every chunk of a layer (it was written to or changed).

        Fills already in flight still hand their bytes to their waiters but do
        not insert them (generation bump), and new readers do not join them.
        Pins are kept as intent.  With ``forget=True`` the buffer is also
        unregistered (and its pins cleared) so ``layer()`` can recreate it, e.g.
        with a new size; the old object keeps working for stragglers but
        caches nothing.
        """
        buf = self._layers.get(identity)
        if buf is None:
            return
        policy = self._policy
        pinned = buf._pinned
        for index, chunk in buf._chunks.items():
            if index in pinned:
                self._pinned_bytes -= len(chunk)
            else:
                policy.remove(buf, index)
        self._used -= buf._resident
        if self.arena is not None:
            for slot in buf._slots.values():
                self.arena.free(slot)
            buf._slots = {}
        buf._chunks = {}
        buf._resident = 0
        buf._inflight = {}
        buf._generation += 1
        if forget:
            del self._layers[identity]
            buf._attached = False
            buf._pinned = set()

    def peek(self, layer: LayerBuffer, index: int) -> bytes | memoryview | None:
        """A resident chunk's bytes without counting a hit or touching the policy.

        With an arena it is a view of shared memory, valid until the next await (an
        eviction may reuse its slot): copy it to keep it.
        """
        return layer._chunks.get(index)

    # --------------------------------------------------------------- hot path

    def lookup(self, layer: LayerBuffer, offset: int, size: int) -> bytes | memoryview | None:
        """Serve a read from memory, or return None (counting nothing) on any miss.

        Synchronous and syscall-free so the FUSE handler can answer hits without
        a trio checkpoint; the only copy is the slice/join of the result.
        """
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset or size: {offset}, {size}")
        end = offset + size
        if end > layer.size:
            end = layer.size
        stats = layer.stats
        total = self.total
        if offset >= end:
            stats.hit_ops += 1
            total.hit_ops += 1
            return b""
        cs = self.chunk_size
        chunks = layer._chunks
        first = offset // cs
        last = (end - 1) // cs
        n = end - offset
        if first == last:
            chunk = chunks.get(first)
            if chunk is None:
                return None
            self._policy.touch(layer, first)
            stats.hit_ops += 1
            stats.hit_bytes += n
            total.hit_ops += 1
            total.hit_bytes += n
            start = offset - first * cs
            if start == 0 and n == len(chunk):
                return chunk
            return chunk[start : start + n]
        get = chunks.get
        pieces: list[bytes | memoryview] = []
        append = pieces.append
        for index in range(first, last + 1):
            chunk = get(index)
            if chunk is None:
                return None
            append(chunk)
        self._policy.touch_range(layer, first, last)
        stats.hit_ops += 1
        stats.hit_bytes += n
        total.hit_ops += 1
        total.hit_bytes += n
        return _join(pieces, offset - first * cs, end - last * cs)

    def lookup_pieces(self, layer: LayerBuffer, offset: int,
                      size: int) -> list[bytes | memoryview] | None:
        """Like :meth:`lookup`, but the pieces of the chunks, not joined: for a reply
        written with one writev, without copying the data once more. Valid until the
        next await."""
        cs = self.chunk_size
        end = min(offset + size, layer.size)
        if offset < 0 or size < 0 or offset >= end or offset // cs == (end - 1) // cs:
            data = self.lookup(layer, offset, size)
            return None if data is None else [data]
        chunks = layer._chunks
        first, last = offset // cs, (end - 1) // cs
        pieces: list[bytes | memoryview] = []
        for index in range(first, last + 1):
            chunk = chunks.get(index)
            if chunk is None:
                return None
            pieces.append(chunk)
        self._policy.touch_range(layer, first, last)
        n = end - offset
        for st in (layer.stats, self.total):
            st.hit_ops += 1
            st.hit_bytes += n
        head, tail = offset - first * cs, end - last * cs
        if head:
            pieces[0] = memoryview(pieces[0])[head:]
        if tail != len(pieces[-1]):
            pieces[-1] = memoryview(pieces[-1])[:tail]  # the last of two or more
        return pieces

    # --------------------------------------------------------------- fill path

    async def read(self, layer: LayerBuffer, offset: int, size: int) -> bytes | memoryview:
        """Return exactly the requested bytes (short only at EOF), filling misses.

        Resident chunks come from memory, chunks someone else is filling are
        awaited, and the rest are read in runs of contiguous missing chunks of
        at most ``max_fill_bytes``, all runs concurrently.
        """
        data = self.lookup(layer, offset, size)
        if data is not None:
            return data
        layer.stats.miss_ops += 1
        self.total.miss_ops += 1
        cs = self.chunk_size
        end = min(offset + size, layer.size)
        first = offset // cs
        last = (end - 1) // cs
        # A miss reads at least the aligned window around it: small chunks keep
        # prefetch exact, the window keeps cold boots from paying one store request
        # per small chunk.
        w = self._window
        wfirst = first - first % w
        wlast = min(last - last % w + w - 1, (layer.size - 1) // cs)
        pieces = await self._gather(layer, wfirst, wlast)
        pieces = pieces[first - wfirst:last - wfirst + 1]
        data = _join(pieces, offset - first * cs, end - last * cs)
        layer.stats.miss_bytes += len(data)
        self.total.miss_bytes += len(data)
        return data

    async def prefetch(self, layer: LayerBuffer, offset: int, length: int) -> int:
        """Fill the missing chunks of a range without reading it; return bytes fetched.

        Not a reader: no hit/miss is counted and resident chunks are not marked
        accessed.  Chunks already in flight are left to their fill (not awaited).
        Raises OSError if one of its own fills fails.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: {offset}, {length}")
        end = min(offset + length, layer.size)
        if offset >= end:
            return 0
        cs = self.chunk_size
        own, _joined = self._plan(layer, offset // cs, (end - 1) // cs, None)
        if not own:
            return 0
        await self._run_flights(own)
        fetched = 0
        for flight in own:
            if flight.error is not None:
                raise type(flight.error)(flight.error.errno, flight.error.strerror)
            if flight.data is not None:
                fetched += len(flight.data)
        return fetched

    def _plan(
        self,
        layer: LayerBuffer,
        first: int,
        last: int,
        out: list[bytes | memoryview | None] | None,
    ) -> tuple[list[_Flight], list[_Flight]]:
        """Classify chunks first..last: resident (into ``out``), in flight (joined),
        or missing (new flights, registered before any await: that is what makes
        the fill single-flight)."""
        chunks = layer._chunks
        inflight = layer._inflight
        touch = self._policy.touch
        max_run = self._max_run
        own: list[_Flight] = []
        joined: list[_Flight] = []
        run_start = -1
        for index in range(first, last + 1):
            missing = False
            if out is None or out[index - first] is None:
                chunk = chunks.get(index)
                if chunk is not None:
                    if out is not None:
                        # A copy: the reader awaits other fills before it uses it, and an
                        # arena slot may be evicted and reused meanwhile.
                        out[index - first] = chunk if type(chunk) is bytes else bytes(chunk)
                        touch(layer, index)
                else:
                    flight = inflight.get(index)
                    if flight is None:
                        missing = True
                    elif flight not in joined:
                        joined.append(flight)
            if missing:
                if run_start < 0:
                    run_start = index
                elif index - run_start == max_run:
                    own.append(self._start_flight(layer, run_start, index - 1))
                    run_start = index
            elif run_start >= 0:
                own.append(self._start_flight(layer, run_start, index - 1))
                run_start = -1
        if run_start >= 0:
            own.append(self._start_flight(layer, run_start, last))
        return own, joined

    def _start_flight(self, layer: LayerBuffer, first: int, last: int) -> _Flight:
        """Create a flight for chunks first..last and mark them in flight."""
        cs = self.chunk_size
        length = min((last + 1) * cs, layer.size) - first * cs
        flight = _Flight(layer, first, last, length)
        inflight = layer._inflight
        for index in range(first, last + 1):
            inflight[index] = flight
        return flight

    async def _gather(self, layer: LayerBuffer, first: int, last: int) -> list[bytes | memoryview]:
        """Collect chunks first..last for a reader: memory, joined fills, own fills."""
        out: list[bytes | memoryview | None] = [None] * (last - first + 1)
        cs = self.chunk_size
        touch = self._policy.touch
        while True:
            own, joined = self._plan(layer, first, last, out)
            if not own and not joined:
                break
            if joined:
                layer.stats.singleflight_joins += len(joined)
                self.total.singleflight_joins += len(joined)
            await self._run_flights(own)
            for flight in joined:  # other tasks run these: waiting in turn costs nothing
                await flight.event.wait()
            error: OSError | None = None
            for flight in (*own, *joined):
                if flight.error is not None:
                    error = error or flight.error
                    continue
                if flight.data is None:
                    continue  # abandoned (its owner was cancelled): plan again
                is_joined = flight in joined
                for index in range(max(flight.first, first), min(flight.last, last) + 1):
                    if out[index - first] is None:
                        out[index - first] = flight.chunk(index, cs)
                        if is_joined:  # a waiter is an access too
                            touch(layer, index)
            if error is not None:
                raise type(error)(error.errno, error.strerror)
        return [piece for piece in out if piece is not None]

    async def _run_flights(self, flights: list[_Flight]) -> None:
        """Run fills concurrently; the common single run skips the nursery (cheaper,
        and its insertion order is deterministic)."""
        if len(flights) == 1:
            await self._run_flight(flights[0])
        elif flights:
            async with trio.open_nursery() as nursery:
                for flight in flights:
                    nursery.start_soon(self._run_flight, flight)

    async def _run_flight(self, flight: _Flight) -> None:
        """Run one fill; publish its bytes or its error to every waiter.

        Never raises OSError (waiters read it off the flight), so one failed run
        does not cancel sibling runs that other readers may be waiting on.
        """
        layer = flight.layer
        length = flight.length
        offset = flight.first * self.chunk_size
        stats = layer.stats
        total = self.total
        bucket = _size_bucket(length)
        for st in (stats, total):
            st.store_reads += 1
            st.store_read_hist[bucket] = st.store_read_hist.get(bucket, 0) + 1
        try:
            data = await layer.fill(offset, length)
            if type(data) is not bytes:  # never keep a buffer the caller may reuse
                data = bytes(data)
            stats.store_bytes += len(data)
            total.store_bytes += len(data)
            if len(data) < length:
                raise ShortFill(
                    errno.EIO,
                    f"short read from store: {len(data)} of {length} bytes at offset {offset}",
                )
            if len(data) > length:
                data = data[:length]
        except OSError as exc:
            if exc.errno is None:
                exc = OSError(errno.EIO, str(exc) or os.strerror(errno.EIO))
            flight.error = exc
            stats.fill_errors += 1
            total.fill_errors += 1
        else:
            flight.data = data
            self._commit(flight)
        finally:
            # Also on cancellation or a bug in fill: waiters then see neither data
            # nor error and plan again instead of hanging.
            inflight = layer._inflight
            for index in range(flight.first, flight.last + 1):
                if inflight.get(index) is flight:
                    del inflight[index]
            flight.event.set()

    # ---------------------------------------------------------------- budget

    def _commit(self, flight: _Flight) -> None:
        """Insert a successful fill's chunks, unless the layer changed meanwhile."""
        layer = flight.layer
        if (not layer._attached or flight.generation != layer._generation
                or flight.started < layer.trusted_at):
            return
        data = flight.data
        assert data is not None
        cs = self.chunk_size
        if flight.first == flight.last:
            self._insert(layer, flight.first, data)
            return
        for k in range(flight.last - flight.first + 1):
            self._insert(layer, flight.first + k, data[k * cs : (k + 1) * cs])

    def _insert(self, layer: LayerBuffer, index: int, chunk: bytes) -> bool:
        """Make room and add one chunk; False if it cannot be cached (too big/pinned)."""
        if index in layer._chunks:
            return True
        nbytes = len(chunk)
        pinned = index in layer._pinned
        if pinned and self._pinned_bytes + nbytes > self.pin_limit:
            layer._pinned.discard(index)  # past the pin limit: cache it unpinned
            pinned = False
        # Pinned bytes cannot be evicted: give up early instead of flushing the
        # cache for a chunk that would not fit anyway.
        if self._pinned_bytes + nbytes > self._budget:
            return False
        policy = self._policy
        arena = self.arena
        while self._used + nbytes > self._budget or (arena is not None and arena.full):
            evicted = policy.evict()
            if evicted is None:  # only pinned chunks left (cannot happen given the check)
                return False
            owner, victim_index = evicted
            victim = owner._chunks.pop(victim_index)
            if arena is not None:
                arena.free(owner._slots.pop(victim_index))
                if not owner._chunks and owner.fill is _dormant_fill:
                    self._layers.pop(owner.identity, None)  # nothing left to adopt
            owner._resident -= len(victim)
            self._used -= len(victim)
            owner.stats.evictions += 1
            self.total.evictions += 1
        if arena is not None:
            slot, view = arena.put(layer.identity, index, chunk)  # type: ignore[arg-type]
            layer._slots[index] = slot
            layer._chunks[index] = view
        else:
            layer._chunks[index] = chunk
        layer._resident += nbytes
        self._used += nbytes
        if pinned:
            self._pinned_bytes += nbytes
        else:
            policy.insert(layer, index, nbytes)
        return True

    # ------------------------------------------------------------------- pins

    def pin(self, layer: LayerBuffer, chunk_indices: Iterable[int]) -> None:
        """Exempt chunks from eviction; not-yet-resident ones are pinned when filled."""
        chunks = layer._chunks
        pinned = layer._pinned
        for index in chunk_indices:
            if index in pinned:
                continue
            chunk = chunks.get(index)
            if chunk is not None:
                if self._pinned_bytes + len(chunk) > self.pin_limit:
                    continue
                self._policy.remove(layer, index)
                self._pinned_bytes += len(chunk)
            pinned.add(index)

    def unpin(self, layer: LayerBuffer, chunk_indices: Iterable[int]) -> None:
        """Make pinned chunks evictable again (they rejoin the policy as if hot)."""
        chunks = layer._chunks
        pinned = layer._pinned
        for index in chunk_indices:
            if index not in pinned:
                continue
            pinned.discard(index)
            chunk = chunks.get(index)
            if chunk is not None:
                self._pinned_bytes -= len(chunk)
                self._policy.readmit(layer, index, len(chunk))

    def unpin_all(self, layer: LayerBuffer) -> None:
        """Unpin every chunk of a layer."""
        self.unpin(layer, list(layer._pinned))

    # ------------------------------------------------------------------ checks

    def check_invariants(self) -> None:
        """Assert the accounting is consistent (used by tests; O(resident chunks))."""
        used = 0
        pinned = 0
        tracked = 0
        for buf in self._layers.values():
            resident = sum(len(c) for c in buf._chunks.values())
            assert resident == buf._resident, (buf, resident)
            used += resident
            untracked = 0
            for index, chunk in buf._chunks.items():
                if index in buf._pinned:
                    pinned += len(chunk)
                    untracked += 1
                else:
                    tracked += 1
            if self.policy == "s3fifo":
                assert len(buf.freq) == len(buf._chunks) - untracked, buf
                assert all(i in buf._chunks and i not in buf._pinned for i in buf.freq), buf
        assert used == self._used, (used, self._used)
        assert pinned == self._pinned_bytes, (pinned, self._pinned_bytes)
        assert tracked == len(self._policy), (tracked, len(self._policy))
        assert self._used <= self._budget, (self._used, self._budget)
