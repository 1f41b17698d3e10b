"""Chunk memory that outlives the daemon: a memfd of fixed-size slots that describe themselves.

With a holder (see holder.py) the shared cache's chunks live in a memfd the
holder keeps, so a restarted daemon starts warm. Each slot has a 64-byte header
saying which layer identity and chunk it holds, with the xxh3 digest of the
data and a checksum of the header itself. Data is written before its header;
a slot is freed by clearing its header first. A successor scans the headers and
keeps a slot only if the header checks out and the data still has its digest:
whatever a crash interrupted is dropped, never served.
"""

from __future__ import annotations

import mmap
import os
import struct

import xxhash

MAGIC = b"SCARENA1"
_HEAD = struct.Struct("<8sIIQQ")  # magic, version, chunk size, slots, high-water mark
_HWM_AT = 24
_SLOT = struct.Struct("<4sIQQQqQQ")  # magic, length, dev, ino, size, mtime (signed), chunk, digest
_CHECK = struct.Struct("<Q")
SLOT_HEADER = 64
_SLOT_MAGIC = b"SCCK"
PAGE = 4096

Identity = tuple[int, int, int, int]
Restored = dict[Identity, dict[int, tuple[int, int]]]  # identity -> chunk -> (slot, length)


def arena_bytes(chunk_size: int, slots: int) -> int:
    headers = -(-slots * SLOT_HEADER // PAGE) * PAGE
    return PAGE + headers + slots * chunk_size


def create_memfd(chunk_size: int, budget: int) -> int:
    """A sparse memfd for a cache of ``budget`` bytes (pages cost memory once written)."""
    fd = os.memfd_create("scachefs-cache", os.MFD_CLOEXEC)
    os.ftruncate(fd, arena_bytes(chunk_size, slots_for(chunk_size, budget)))
    return fd


def slots_for(chunk_size: int, budget: int) -> int:
    """Slots for a budget: one per whole chunk, so the arena's memory never exceeds it.

    A partial last chunk of a layer takes a whole slot too; the cache evicts when it
    runs out of slots as it does when it runs out of bytes (see ChunkCache._insert).
    """
    return max(1, budget // chunk_size)


class Arena:
    """Slots of ``chunk_size`` bytes in a shared mapping, with their headers."""

    def __init__(self, fd: int, chunk_size: int, slots: int) -> None:
        self.chunk_size = chunk_size
        self.slots = slots
        size = arena_bytes(chunk_size, slots)
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        self._map = mmap.mmap(fd, size)
        self._view = memoryview(self._map)
        self._headers = PAGE
        self._data = PAGE + -(-slots * SLOT_HEADER // PAGE) * PAGE
        self._free: list[int] = []
        magic, version, cs, count, hwm = _HEAD.unpack_from(self._map, 0)
        self.reusable = magic == MAGIC and version == 1 and cs == chunk_size and count == slots
        if not self.reusable:  # another geometry (or nothing): start cold
            _HEAD.pack_into(self._map, 0, MAGIC, 1, chunk_size, slots, 0)
            hwm = 0
        self._hwm: int = int(hwm)

    def view(self, slot: int, length: int) -> memoryview:
        start = self._data + slot * self.chunk_size
        return self._view[start:start + length]

    @property
    def full(self) -> bool:
        """No slot is free: the cache must evict a chunk before it puts one."""
        return not self._free and self._hwm >= self.slots

    def _allocate(self) -> int:
        if self._free:
            return self._free.pop()
        if self._hwm < self.slots:
            slot = self._hwm
            self._hwm += 1
            struct.pack_into("<Q", self._map, _HWM_AT, self._hwm)
            return slot
        raise MemoryError("cache arena full")  # ChunkCache._insert evicts before put

    def put(self, identity: Identity, chunk: int, data: bytes | memoryview) -> tuple[int,
                                                                                   memoryview]:
        """Copy a chunk into a free slot; (slot, a view of it)."""
        slot = self._allocate()
        length = len(data)
        view = self.view(slot, length)
        view[:] = data
        dev, ino, size, mtime = identity
        head = _SLOT.pack(_SLOT_MAGIC, length, dev, ino, size, mtime, chunk,
                          xxhash.xxh3_64_intdigest(data))
        at = self._headers + slot * SLOT_HEADER
        self._map[at:at + _SLOT.size] = head  # after the data: a torn write never verifies
        _CHECK.pack_into(self._map, at + _SLOT.size, xxhash.xxh3_64_intdigest(head))
        return slot, view

    def free(self, slot: int) -> None:
        """Give a slot back; its header is cleared first, so no successor adopts it."""
        self._map[self._headers + slot * SLOT_HEADER:
                  self._headers + slot * SLOT_HEADER + 4] = b"\0\0\0\0"
        self._free.append(slot)

    def scan(self) -> Restored:
        """Every slot a predecessor left that still checks out, by identity and chunk.

        The caller owns every slot it returns (it must adopt or free each); the rest
        are free. A chunk found in two slots keeps one of them. Blocking (it reads
        every used slot): run it before serving or in a worker.
        """
        restored: Restored = {}
        if not self.reusable:
            return restored
        for slot in range(self._hwm):
            at = self._headers + slot * SLOT_HEADER
            head = bytes(self._map[at:at + _SLOT.size])
            (check,) = _CHECK.unpack_from(self._map, at + _SLOT.size)
            magic, length, dev, ino, size, mtime, chunk, digest = _SLOT.unpack(head)
            if (magic != _SLOT_MAGIC or xxhash.xxh3_64_intdigest(head) != check
                    or not 0 < length <= self.chunk_size
                    or xxhash.xxh3_64_intdigest(self.view(slot, length)) != digest):
                self._free.append(slot)
                continue
            chunks = restored.setdefault((dev, ino, size, mtime), {})
            if chunk in chunks:  # one owner per chunk: the other slot is free again
                self.free(slot)
                continue
            chunks[chunk] = (slot, length)
        return restored
