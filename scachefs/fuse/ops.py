"""What a file system implements on top of the session: handler methods and their types.

A file system subclasses :class:`Operations` and overrides the handlers it
serves; every other opcode answers ENOSYS. Handlers are async (they run as trio
tasks) except the few the session calls inline on its read loop (``forget``,
``read_now``, ``getxattr_now``), which must never block.

Errors: raise :class:`FuseError` (or let an ``OSError`` through) and the
caller gets that errno; any other exception is a bug, logged, answered EIO.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scachefs.fuse.session import DirBuffer


class FuseError(Exception):
    """Answer the request with ``errno`` (a positive errno value)."""

    def __init__(self, err: int) -> None:
        super().__init__(err, os.strerror(err))
        self.errno = err


@dataclasses.dataclass(slots=True)
class Request:
    """Who asks: the caller's ids and pid, and the request's id on the wire."""

    uid: int
    gid: int
    pid: int
    unique: int = 0
    umask: int = 0  # for create, mknod and mkdir
    # Supplementary groups the kernel vouches for (FUSE_CREATE_SUPP_GROUP: on create,
    # mkdir, mknod and symlink, the parent directory's group if the caller is in it).
    groups: tuple[int, ...] = ()
    acl_kill_sgid: bool = False  # setxattr of an ACL by a caller outside the file's group

    @property
    def resent(self) -> bool:
        """Resent after a takeover: the dead daemon may have done it (see resend.py)."""
        return bool(self.unique >> 63)


@dataclasses.dataclass(slots=True)
class Entry:
    """A looked-up object: the kernel keeps ``nodeid`` until it forgets it."""

    nodeid: int
    attr: os.stat_result
    ino: int = 0  # the number stat(2) shows; 0: the object's own st_ino
    generation: int = 0
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0


@dataclasses.dataclass(slots=True)
class Attr:
    """Attributes for getattr and setattr replies."""

    attr: os.stat_result
    ino: int = 0
    timeout: float = 1.0


@dataclasses.dataclass(slots=True)
class Opened:
    """How an open file is served: by us, or by the kernel (``backing_id``)."""

    fh: int
    keep_cache: bool = False
    direct_io: bool = False
    backing_id: int = 0  # non-zero: FOPEN_PASSTHROUGH with this backing file
    noflush: bool = False


@dataclasses.dataclass(slots=True)
class Lock:
    """A byte-range lock (inclusive ``end``; 2**63-1: to the end of file) or a flock()."""

    type: int  # fcntl.F_RDLCK, F_WRLCK or F_UNLCK
    start: int = 0
    end: int = (1 << 63) - 1
    pid: int = 0
    flock: bool = False


@dataclasses.dataclass(slots=True)
class SetAttr:
    """The changes a setattr asks for: None means unchanged."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None  # nanoseconds since 1970 (negative before)
    mtime_ns: int | None = None
    atime_now: bool = False  # set atime to the store's "now" (utimensat's UTIME_NOW)
    mtime_now: bool = False
    fh: int | None = None
    kill_suidgid: bool = False


class Operations:
    """Handlers of a FUSE file system; each default answers ENOSYS."""

    # ----------------------------------------------------------- the session
    def init(self, capable: int) -> int:
        """Called once with the kernel's INIT flags; returns the wanted subset."""
        return 0

    def destroy(self) -> None:
        """The kernel unmounted the file system (FUSE_DESTROY)."""

    def failed(self, op: str, exc: OSError) -> None:
        """A handler of ``op`` answered an OSError (for logging; the caller gets its errno)."""

    # ------------------------------------------------------------- inline
    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        """Drop kernel references: (nodeid, count) pairs. Inline; never raises."""

    def read_now(self, fh: int, offset: int,
                 size: int) -> Sequence[bytes | memoryview] | None:
        """Answer a read from memory without awaiting (the reply's pieces, written with
        one writev), or None to call :meth:`read`."""
        return None

    def getxattr_now(self, nodeid: int, name: bytes) -> bytes | int | None:
        """Answer a getxattr without awaiting (bytes, or an errno), or None to await."""
        return None

    # ------------------------------------------------------------- nodes
    async def lookup(self, parent: int, name: bytes, req: Request) -> Entry:
        raise FuseError(errno.ENOSYS)

    async def getattr(self, nodeid: int, fh: int | None, req: Request) -> Attr:
        raise FuseError(errno.ENOSYS)

    async def setattr(self, nodeid: int, changes: SetAttr, req: Request) -> Attr:
        raise FuseError(errno.ENOSYS)

    async def readlink(self, nodeid: int, req: Request) -> bytes:
        raise FuseError(errno.ENOSYS)

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
                    req: Request) -> Entry:
        raise FuseError(errno.ENOSYS)

    async def mkdir(self, parent: int, name: bytes, mode: int, req: Request) -> Entry:
        raise FuseError(errno.ENOSYS)

    async def symlink(self, parent: int, name: bytes, target: bytes, req: Request) -> Entry:
        raise FuseError(errno.ENOSYS)

    async def unlink(self, parent: int, name: bytes, req: Request) -> None:
        raise FuseError(errno.ENOSYS)

    async def rmdir(self, parent: int, name: bytes, req: Request) -> None:
        raise FuseError(errno.ENOSYS)

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
                     flags: int, req: Request) -> None:
        raise FuseError(errno.ENOSYS)

    async def link(self, nodeid: int, new_parent: int, new_name: bytes,
                   req: Request) -> Entry:
        raise FuseError(errno.ENOSYS)

    async def statfs(self, nodeid: int, req: Request) -> os.statvfs_result:
        raise FuseError(errno.ENOSYS)

    async def access(self, nodeid: int, mask: int, req: Request) -> None:
        raise FuseError(errno.ENOSYS)

    # ------------------------------------------------------------- files
    async def open(self, nodeid: int, flags: int, req: Request) -> Opened:
        raise FuseError(errno.ENOSYS)

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     req: Request) -> tuple[Entry, Opened]:
        raise FuseError(errno.ENOSYS)

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        raise FuseError(errno.ENOSYS)

    async def write(self, fh: int, offset: int, data: bytes, kill_suidgid: bool) -> int:
        raise FuseError(errno.ENOSYS)

    async def flush(self, fh: int, lock_owner: int = 0) -> None:
        raise FuseError(errno.ENOSYS)

    async def getlk(self, fh: int, owner: int, lock: Lock) -> Lock:
        """The first lock that conflicts with ``lock`` (type F_UNLCK if none)."""
        raise FuseError(errno.ENOSYS)

    async def setlk(self, fh: int, owner: int, lock: Lock, wait: bool) -> None:
        """Take or release ``lock``; EAGAIN on a conflict unless ``wait``."""
        raise FuseError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        raise FuseError(errno.ENOSYS)

    async def fsync(self, fh: int, datasync: bool) -> None:
        raise FuseError(errno.ENOSYS)

    async def fallocate(self, fh: int, offset: int, length: int, mode: int,
                        req: Request) -> None:
        raise FuseError(errno.ENOSYS)

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        raise FuseError(errno.ENOSYS)

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                              length: int, flags: int, req: Request) -> int:
        raise FuseError(errno.ENOSYS)

    # ------------------------------------------------------------- directories
    async def opendir(self, nodeid: int, req: Request) -> int:
        raise FuseError(errno.ENOSYS)

    async def readdir(self, fh: int, offset: int, out: DirBuffer) -> None:
        """Add entries from ``offset`` on until ``out.add`` returns False or the end."""
        raise FuseError(errno.ENOSYS)

    async def releasedir(self, fh: int) -> None:
        raise FuseError(errno.ENOSYS)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        raise FuseError(errno.ENOSYS)

    # ------------------------------------------------------------- xattrs
    async def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int,
                       req: Request) -> None:
        raise FuseError(errno.ENOSYS)

    async def getxattr(self, nodeid: int, name: bytes, req: Request) -> bytes:
        raise FuseError(errno.ENOSYS)

    async def listxattr(self, nodeid: int, req: Request) -> list[bytes]:
        raise FuseError(errno.ENOSYS)

    async def removexattr(self, nodeid: int, name: bytes, req: Request) -> None:
        raise FuseError(errno.ENOSYS)
