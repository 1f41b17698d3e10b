"""Eviction policies of the chunk cache: which unpinned resident chunk goes first.

A policy orders (layer buffer, chunk index) pairs; the cache tells it about
inserts, hits and removals and asks it for a victim when the budget is full.
S3-FIFO is the default (scan resistant, see docs/benchmarks.md); LRU is the
baseline it is measured against. A policy keeps its per-chunk counters in the
layer buffer's ``freq`` dict, so a hit costs one int-keyed dict update.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

POLICIES = ("s3fifo", "lru")
MAX_FREQ = 3  # 2-bit frequency counter of S3-FIFO

Key = tuple[Hashable, int]
"""(layer identity, chunk index): how the S3-FIFO ghost remembers evicted chunks."""


class Tracked(Protocol):
    """What a policy needs of a layer buffer."""

    identity: Hashable
    freq: dict[int, int]


L = TypeVar("L", bound=Tracked)


class EvictionPolicy(Protocol[L]):
    """Eviction order over the unpinned resident chunks of all layers.

    Methods take (layer, chunk index) rather than a key tuple so that a hit can
    update the policy without allocating or hashing a tuple.
    """

    def insert(self, layer: L, index: int, nbytes: int) -> None: ...
    def readmit(self, layer: L, index: int, nbytes: int) -> None: ...
    def touch(self, layer: L, index: int) -> None: ...
    def touch_range(self, layer: L, first: int, last: int) -> None: ...
    def remove(self, layer: L, index: int) -> None: ...
    def evict(self) -> tuple[L, int] | None: ...
    def __len__(self) -> int: ...


class LRU(Generic[L]):
    """Plain LRU on an OrderedDict: the baseline S3-FIFO is compared against."""

    def __init__(self) -> None:
        self._order: OrderedDict[tuple[L, int], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def insert(self, layer: L, index: int, nbytes: int) -> None:
        self._order[layer, index] = None

    def readmit(self, layer: L, index: int, nbytes: int) -> None:
        self._order[layer, index] = None

    def touch(self, layer: L, index: int) -> None:
        try:
            self._order.move_to_end((layer, index))
        except KeyError:  # pinned chunks are not tracked
            pass

    def touch_range(self, layer: L, first: int, last: int) -> None:
        move = self._order.move_to_end
        for index in range(first, last + 1):
            try:
                move((layer, index))
            except KeyError:
                pass

    def remove(self, layer: L, index: int) -> None:
        self._order.pop((layer, index), None)

    def evict(self) -> tuple[L, int] | None:
        if not self._order:
            return None
        return self._order.popitem(last=False)[0]


class S3FIFO(Generic[L]):
    """S3-FIFO (Yang et al., SOSP'23), sized in bytes.

    New chunks enter the small FIFO (~10% of the budget); those read again
    before reaching its head move to the main FIFO, the others are evicted and
    remembered in the ghost FIFO, so a chunk that comes back soon goes straight
    to main.  Main is FIFO with reinsertion driven by a 2-bit counter.  One-pass
    scans therefore churn only the small FIFO and leave the working set alone.
    The counters live in each layer's ``freq`` dict, so a hit is one int-keyed
    dict update.  Ghost keys use the layer identity, which outlives a buffer.
    """

    def __init__(self, budget_bytes: int, chunk_size: int, small_ratio: float = 0.1) -> None:
        self._small: OrderedDict[tuple[L, int], int] = OrderedDict()
        self._main: OrderedDict[tuple[L, int], int] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._small_bytes = 0
        self._small_target = max(1, int(budget_bytes * small_ratio))
        # The ghost remembers as many keys as main can hold chunks.
        self._ghost_max = max(1, (budget_bytes - self._small_target) // chunk_size)

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def insert(self, layer: L, index: int, nbytes: int) -> None:
        layer.freq[index] = 0
        ghost_key = (layer.identity, index)
        if ghost_key in self._ghost:
            del self._ghost[ghost_key]
            self._main[layer, index] = nbytes
        else:
            self._small[layer, index] = nbytes
            self._small_bytes += nbytes

    def readmit(self, layer: L, index: int, nbytes: int) -> None:
        layer.freq[index] = 0
        self._main[layer, index] = nbytes

    def touch(self, layer: L, index: int) -> None:
        freq = layer.freq
        f = freq.get(index, MAX_FREQ)  # untracked (pinned) counts as saturated
        if f < MAX_FREQ:
            freq[index] = f + 1

    def touch_range(self, layer: L, first: int, last: int) -> None:
        freq = layer.freq
        get = freq.get
        for index in range(first, last + 1):
            f = get(index, MAX_FREQ)
            if f < MAX_FREQ:
                freq[index] = f + 1

    def remove(self, layer: L, index: int) -> None:
        if layer.freq.pop(index, None) is None:
            return
        nbytes = self._small.pop((layer, index), None)
        if nbytes is not None:
            self._small_bytes -= nbytes
        else:
            del self._main[layer, index]

    def evict(self) -> tuple[L, int] | None:
        small, main = self._small, self._main
        # Terminates: every step either evicts, moves a chunk from small to main
        # with its counter cleared, or lowers a main counter (bounded at 3).
        while small or main:
            if small and (self._small_bytes >= self._small_target or not main):
                key, nbytes = small.popitem(last=False)
                self._small_bytes -= nbytes
                layer, index = key
                freq = layer.freq
                if freq[index] > 0:
                    freq[index] = 0
                    main[key] = nbytes
                    continue
                del freq[index]
                ghost = self._ghost
                ghost[layer.identity, index] = None
                if len(ghost) > self._ghost_max:
                    ghost.popitem(last=False)
                return key
            key, nbytes = main.popitem(last=False)
            layer, index = key
            freq = layer.freq
            f = freq[index]
            if f > 0:
                freq[index] = f - 1
                main[key] = nbytes
                continue
            del freq[index]
            return key
        return None


def make_policy(name: str, budget_bytes: int, chunk_size: int) -> EvictionPolicy[L]:
    """The policy called ``name``; ValueError for an unknown one."""
    if name == "s3fifo":
        return S3FIFO(budget_bytes, chunk_size)
    if name == "lru":
        return LRU()
    raise ValueError(f"unknown policy {name!r}; expected one of {POLICIES}")
