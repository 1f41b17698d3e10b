"""Worker threads for blocking calls, so the trio loop only ever schedules.

Every syscall that can touch a disk goes through :func:`WorkerPool.run`, which
runs it in a thread behind one ``trio.CapacityLimiter`` (the ``threads`` option).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

import trio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class WorkerPool:
    """A bounded set of threads for blocking store I/O."""

    def __init__(self, threads: int) -> None:
        self.limiter = trio.CapacityLimiter(threads)

    async def run(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """Run ``fn(*args)`` in a worker thread; OSError propagates with its errno."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
