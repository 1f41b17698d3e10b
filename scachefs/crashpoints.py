"""Deliberate crashes at chosen points of the daemon, for the crash-model test.

``SCACHEFS_CRASH_AT=POINT:N,POINT:N,...`` (never set in production): the daemon of
generation G (0 for the first, 1 for its first successor, ...) SIGKILLs itself the
N-th time it reaches the G-th listed point; generations past the list never do.
Points: ``journal-before`` and ``journal-after`` (a state record is about to be /
was just written), ``compact`` (a compaction wrote the new region but has not yet
switched to it).
"""

from __future__ import annotations

import os
import signal

ENV = "SCACHEFS_CRASH_AT"

_point: str | None = None
_left = 0


def arm(generation: int) -> None:
    """Arm this daemon's crash point, if the environment lists one for its generation."""
    global _point, _left
    spec = os.environ.get(ENV, "").split(",")  # an empty item: that generation never does
    _point = None
    if generation < len(spec) and spec[generation]:
        point, _, count = spec[generation].partition(":")
        _point, _left = point, max(1, int(count or 1))


def reached(point: str) -> None:
    """Die here if this is the armed point's N-th visit."""
    global _left
    if point != _point:
        return
    _left -= 1
    if _left == 0:
        os.kill(os.getpid(), signal.SIGKILL)
