"""Boot sessions: which chunks of a layer one VM's boot reads, and when.

A session starts when a VM's handle of a backing layer reads, and ends at the
handle's release, when its reads go quiet, or after the boot window. Only
sessions that read enough count as boots (``qemu-img info`` and probes do not).
Noting a read is a few dict operations on the hot path: no I/O, no allocation
beyond the first access of a chunk.
"""

from __future__ import annotations

import time

MIN_REQUESTS = 64  # fewer reads than this is a probe, not a boot
MIN_CHUNKS = 16
MAX_CHUNKS = 1 << 20  # a session never grows without bound


class BootSession:
    """The reads one handle made of one layer since it started."""

    def __init__(self, chunk_size: int, layer_size: int, now: float | None = None) -> None:
        self.chunk_size = chunk_size
        self.layer_size = layer_size  # reads past the end read nothing and record nothing
        self.start = time.monotonic() if now is None else now
        self.started_wall = int(time.time())
        self.last = self.start
        self.requests = 0
        self.bytes = 0
        self.first_ms: dict[int, int] = {}  # chunk index -> ms since start, insertion-ordered

    def note(self, offset: int, size: int, now: float) -> None:
        """Record one read (the FUSE read handler's view)."""
        self.requests += 1
        self.bytes += size
        self.last = now
        end = min(offset + size, self.layer_size)
        if end <= offset or len(self.first_ms) >= MAX_CHUNKS:
            return
        ms = int((now - self.start) * 1000)
        first_ms = self.first_ms
        cs = self.chunk_size
        for chunk in range(offset // cs, (end - 1) // cs + 1):
            if chunk not in first_ms:
                first_ms[chunk] = ms

    def over(self, now: float, window: float, quiet: float) -> bool:
        """True once the boot window has passed or the reads went quiet."""
        return now - self.start >= window or (self.requests > 0 and now - self.last >= quiet)

    def is_boot(self) -> bool:
        return self.requests >= MIN_REQUESTS and len(self.first_ms) >= MIN_CHUNKS

    @property
    def duration_ms(self) -> int:
        return int((self.last - self.start) * 1000)
