"""Locks through the mount are the store's locks.

qemu locks its images (OFD locks) so that two VMs never run on one overlay; on a
network store those locks reach every host. The kernel sends a FUSE file's POSIX,
OFD and flock() locks to the daemon (``FUSE_POSIX_LOCKS``, ``FUSE_FLOCK_LOCKS``),
which takes them on the store file through its own descriptor of that open file
(``OpenFile.fd``, one open file description per FUSE open), as OFD locks or flock(),
so they conflict with every other holder on the store, local or remote, exactly as
the store decides. The descriptor outlives a daemon restart (the holder keeps a copy,
keeper.py), and so do the locks.

Owners: the store sees one owner per FUSE open. That is exact for OFD locks and
flock() (qemu's case); POSIX locks of processes sharing one open file (after fork)
do not conflict with each other through the mount, and a POSIX lock taken through
a read-only descriptor is released when that open file is closed rather than at
the first close() of any descriptor of the file by its process (docs/security.md).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

OFFSET_MAX = (1 << 63) - 1
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type whence start len pid
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def _length(start: int, end: int) -> int:
    """struct flock's l_len for FUSE's inclusive [start, end] (0: to the end of file)."""
    return 0 if end >= OFFSET_MAX else end - start + 1


def get(fd: int, kind: int, start: int, end: int) -> tuple[int, int, int, int]:
    """The first lock that would conflict with ``kind`` on [start, end]: (type, start,
    end, pid), type F_UNLCK if none (blocking: a store call)."""
    arg = _FLOCK.pack(kind, os.SEEK_SET, start, _length(start, end), 0)
    out = fcntl.fcntl(fd, F_OFD_GETLK, arg)
    ltype, _, lstart, llen, pid = _FLOCK.unpack(out)
    lend = OFFSET_MAX if llen == 0 else lstart + llen - 1
    return ltype, lstart, lend, pid


def set_range(fd: int, kind: int, start: int, end: int) -> None:
    """Take or release an OFD lock on [start, end] without waiting (EAGAIN on conflict)."""
    arg = _FLOCK.pack(kind, os.SEEK_SET, start, _length(start, end), 0)
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, arg)
    except OSError as exc:
        if exc.errno == errno.EACCES:  # some file systems say EACCES for a conflict
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN)) from None
        raise


def set_flock(fd: int, kind: int) -> None:
    """flock() the open file without waiting (EWOULDBLOCK on conflict)."""
    op = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX}.get(kind, fcntl.LOCK_UN)
    fcntl.flock(fd, op | (fcntl.LOCK_NB if op != fcntl.LOCK_UN else 0))


def unlock_all(fd: int) -> None:
    """Release every OFD lock of the open file (a POSIX owner closed its descriptor)."""
    set_range(fd, fcntl.F_UNLCK, 0, OFFSET_MAX)
