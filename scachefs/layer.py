"""A backing layer attached to the shared cache: the state the file system and boots share.

It lives in a module of its own so that :mod:`scachefs.fs` (which attaches,
serves and drops layers) and :mod:`scachefs.boots` (which records, saves and
prefetches them) both import it and neither imports the other.
"""

from __future__ import annotations

import dataclasses
import os

import trio

from scachefs.chunkcache import LayerBuffer
from scachefs.prefetch import Progress
from scachefs.recorder import BootSession
from scachefs.shadow import Key
from scachefs.traces import LayerId, TraceFile, WorkingSet

Identity = tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns)


def identity_of(st: os.stat_result) -> Identity:
    """A layer's identity: stable across renames and hard links, new when its data changes.

    ctime is left out on purpose: renames and links change it without changing data.
    """
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclasses.dataclass(eq=False)
class Layer:
    """A backing layer attached to the cache: its buffer and its own read descriptor."""

    key: Key
    identity: Identity
    path: str
    fd: int
    buffer: LayerBuffer = dataclasses.field(init=False)
    handles: int = 0  # open read-only handles: the VMs attached
    fills: int = 0  # store reads in flight on fd
    active: bool = True  # False once dropped: handles then read the store directly
    # Boot traces (see boots.py).
    trace_id: LayerId | None = None  # the host-independent identity traces are keyed by
    identifying: bool = False  # a retry of a failed fingerprint read is running
    loaded: trio.Event = dataclasses.field(default_factory=trio.Event)
    trace_files: list[TraceFile] = dataclasses.field(default_factory=list)
    trace: WorkingSet | None = None
    trace_status: str = "loading"
    should_record: bool = False
    session: BootSession | None = None
    session_owner: object = None
    progress: Progress | None = None
    prefetch_scope: trio.CancelScope | None = None
    loading: bool = False

    @property
    def size(self) -> int:
        return self.identity[2]

    def release_fd(self) -> None:
        """Close a dropped layer's descriptor once nothing can use it any more.

        Every user of ``fd`` outside the trio thread counts itself in ``fills`` (or
        ``handles``) first, so the number is never closed, and reused, under it.
        """
        if not self.active and self.handles == 0 and self.fills == 0 and self.fd >= 0:
            os.close(self.fd)  # a dup of a read-only descriptor: no I/O on close
            self.fd = -1
