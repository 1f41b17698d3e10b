"""Boot sessions: which chunks of a layer one VM's boot reads, and when.

A session starts when a VM's handle of a backing layer reads, and ends at the
handle's release, when its reads go quiet, or at the end of the boot window:
reads after the window are not part of it. Only sessions that read enough count
as boots (``qemu-img info`` and probes do not), and a **scan** is not a boot: a
``sha256sum``, ``cp`` or backup of the layer reads it in order, each read
continuing where the previous one ended, covering everything between its first
and last chunk; a boot jumps around (a Debian guest: ~22% of its reads continue
the previous one, 13% of the file in ~244 extents). Noting a read is a few dict
operations on the hot path: no I/O, no allocation beyond the first access of a
chunk.
"""

from __future__ import annotations

import math
import time

MIN_REQUESTS = 64  # fewer reads than this is a probe, not a boot
MIN_CHUNKS = 16
MAX_CHUNKS = 1 << 20  # a session never grows without bound
# A read "continues" the previous one when it starts within this many bytes of where
# that one ended (a kernel's readahead may deliver neighbouring requests out of order).
SCAN_SLACK = 256 << 10
SCAN_SEQUENTIAL = 0.8  # a scan: at least this share of its reads continue the previous
SCAN_DENSITY = 0.9  # ... and it read at least this share of the chunks in its span


class BootSession:
    """The reads one handle made of one layer since it started."""

    def __init__(self, chunk_size: int, layer_size: int, now: float | None = None,
                 window: float = math.inf) -> None:
        self.chunk_size = chunk_size
        self.layer_size = layer_size  # reads past the end read nothing and record nothing
        self.start = time.monotonic() if now is None else now
        self.window = window  # reads this long after the start are not part of the session
        self.started_wall = int(time.time())
        self.last = self.start
        self.requests = 0
        self.bytes = 0
        self.sequential = 0  # reads that continued where the previous read ended
        self.next_offset = -1  # where the previous read ended
        self.low = self.high = -1  # the lowest and highest chunk read
        self.first_ms: dict[int, int] = {}  # chunk index -> ms since start, insertion-ordered

    def note(self, offset: int, size: int, now: float) -> None:
        """Record one read (the FUSE read handler's view)."""
        if now - self.start >= self.window:
            return  # the session is over: its watcher ends it within a second
        self.requests += 1
        self.bytes += size
        self.last = now
        if abs(offset - self.next_offset) <= SCAN_SLACK:
            self.sequential += 1
        self.next_offset = offset + size
        end = min(offset + size, self.layer_size)
        if end <= offset or len(self.first_ms) >= MAX_CHUNKS:
            return
        ms = int((now - self.start) * 1000)
        first_ms = self.first_ms
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        if self.low < 0 or first < self.low:
            self.low = first
        if last > self.high:
            self.high = last
        for chunk in range(first, last + 1):
            if chunk not in first_ms:
                first_ms[chunk] = ms

    def over(self, now: float, window: float, quiet: float) -> bool:
        """True once the boot window has passed or the reads went quiet."""
        return now - self.start >= window or (self.requests > 0 and now - self.last >= quiet)

    def is_scan(self) -> bool:
        """A read of the layer in order, like sha256sum or cp: not a boot."""
        if self.requests == 0 or not self.first_ms:
            return False
        span = self.high - self.low + 1
        return (self.sequential >= SCAN_SEQUENTIAL * self.requests
                and len(self.first_ms) >= SCAN_DENSITY * span)

    def is_boot(self) -> bool:
        return (self.requests >= MIN_REQUESTS and len(self.first_ms) >= MIN_CHUNKS
                and not self.is_scan())

    def why_not_boot(self) -> str:
        """Why is_boot() is False, for the log."""
        if self.requests >= MIN_REQUESTS and len(self.first_ms) >= MIN_CHUNKS:
            return (f"a scan, not a boot: {self.sequential} of {self.requests} reads "
                    f"continued the previous one, over {len(self.first_ms)} of "
                    f"{self.high - self.low + 1} chunks")
        return f"too few reads for a boot ({self.requests} reads, {len(self.first_ms)} chunks)"

    @property
    def duration_ms(self) -> int:
        return int((min(self.last, self.start + self.window) - self.start) * 1000)
