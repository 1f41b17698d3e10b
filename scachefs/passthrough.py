"""The passthrough filesystem: SOURCE re-exported at MOUNTPOINT with the store's semantics.

Modelled on libfuse's passthrough_hp: an inode table of O_PATH descriptors, every
access relative to them, lookup counts released on forget. Every blocking call
runs in a worker thread (:mod:`scachefs.workers`); handlers only dispatch.
Errors from the store reach the caller with the store's errno.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import resource
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from scachefs import syscalls
from scachefs.inodes import Inode, InodeTable
from scachefs.options import MountOptions
from scachefs.workers import WorkerPool

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# Flags that make no sense when the daemon reopens an existing object for a caller.
# O_NOFOLLOW: the kernel already resolved the name without following it, and the
# reopen goes through /proc/self/fd/N, a magic link that O_NOFOLLOW refuses (ELOOP).
_STRIP_OPEN_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW
_READDIR_BATCH = 32
FD_RESERVE = 32  # descriptors kept free for opens, store reads and traces (at least)
FD_BASELINE = 16  # descriptors of the process itself: stdio, /dev/fuse, the trace dir, ...
_CAPS_XATTR = b"security.capability"
# Errors an operator must hear about (the caller gets them too); ENOENT & co. are normal.
_STORE_TROUBLE = frozenset({errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ESTALE,
                            errno.ENOTCONN, errno.ETIMEDOUT})


_trouble_logged: dict[tuple[str, int], tuple[float, int]] = {}


def _store_trouble(op: str, exc: OSError) -> None:
    """Log a store error, at most once per operation and errno every 10 s (with a count)."""
    key = (op, exc.errno or 0)
    now = time.monotonic()
    last, suppressed = _trouble_logged.get(key, (-10.0, 0))
    if now - last < 10:
        _trouble_logged[key] = (last, suppressed + 1)
        return
    more = f" ({suppressed} more like it since the last report)" if suppressed else ""
    log.warning("%s failed in the store: %s%s", op, exc, more)
    _trouble_logged[key] = (now, 0)


def fuse_errors(fn: F) -> F:
    """Turn OSError into the same errno for the caller and never let a bug kill the loop."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except OSError as exc:
            if exc.errno in _STORE_TROUBLE:
                _store_trouble(fn.__name__, exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


@dataclasses.dataclass(eq=False)
class OpenFile:
    """An open file handle: our own descriptor of the store file."""

    fd: int
    inode: Inode
    flags: int

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_RDONLY


@dataclasses.dataclass(eq=False)
class OpenDir:
    """An open directory handle with the listing taken at the first readdir."""

    fd: int
    inode: Inode
    names: list[bytes] | None = None


def _open_path(dir_fd: int, name: bytes) -> tuple[int, os.stat_result]:
    """O_PATH-open ``name`` in a directory without following a final symlink."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _open_paths(dir_fd: int, names: Sequence[bytes]) -> list[tuple[int, bytes, int, Any]]:
    """Batch of _open_path for readdir; entries that vanished meanwhile are skipped."""
    out = []
    for index, name in enumerate(names):
        try:
            fd, st = _open_path(dir_fd, name)
        except FileNotFoundError:
            continue
        out.append((index, name, fd, st))
    return out


def pread_full(fd: int, size: int, offset: int) -> bytes:
    """pread until ``size`` bytes or end of file (blocking).

    A FUSE reply shorter than asked means end of file to the kernel (qemu with
    aio=native and the page cache then fill in zeros), so a store's short read,
    e.g. the bytes before a bad sector, is never passed on: the rest is read
    again, which returns the store's error.
    """
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    done = len(data)
    while done < size:
        more = os.pread(fd, size - done, offset + done)
        if not more:
            break  # end of file
        parts.append(more)
        done += len(more)
    return b"".join(parts)


def _list_dir(fd: int) -> list[bytes]:
    return [os.fsencode(name) for name in os.listdir(fd)]


def _flush(fd: int) -> None:
    """close(dup(fd)): lets stores such as NFS report write-back errors at close."""
    os.close(os.dup(fd))


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Passthrough(pyfuse3.Operations):
    """All FUSE operations as a passthrough of the store directory."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, root_fd: int, options: MountOptions) -> None:
        super().__init__()
        self.options = options
        self.table = InodeTable(root_fd, os.fstat(root_fd))
        self.workers = WorkerPool(options.threads)
        self.files: dict[int, OpenFile] = {}
        self.dirs: dict[int, OpenDir] = {}
        self._next_fh = 1
        self._as_root = os.geteuid() == 0
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_warned = -10.0
        self.hidden: frozenset[bytes] = frozenset()  # names at the root the mount hides

    # ----------------------------------------------------------------- helpers
    def _inode(self, ino: int) -> Inode:
        inode = self.table.get(ino)
        if inode is None:
            raise FUSEError(errno.ESTALE)
        return inode

    def _dir(self, ino: int, name: bytes, err: int = errno.EPERM) -> Inode:
        """The parent directory of ``name``; refuses the names the mount hides."""
        parent = self._inode(ino)
        if name in self.hidden and parent is self.table.root:
            raise FUSEError(err)
        return parent

    def fds_in_use(self) -> int:
        """Descriptors the daemon holds for the kernel's objects (an estimate without syscalls)."""
        return len(self.table) + len(self.files) + len(self.dirs) + FD_BASELINE

    def _fd_budget_low(self) -> bool:
        return self.fds_in_use() + max(FD_RESERVE, self.fd_limit // 32) >= self.fd_limit

    def _check_fd_budget(self) -> None:
        """Refuse a new kernel object (ENFILE, logged) when descriptors run short.

        Each object the kernel knows costs one O_PATH descriptor; the reserve keeps
        descriptors for opens, store reads and trace files, so running out shows as
        one clear error on lookups instead of EMFILE anywhere.
        """
        if not self._fd_budget_low():
            return
        in_use = self.fds_in_use()
        now = time.monotonic()
        if now - self._fd_warned >= 10:
            self._fd_warned = now
            log.error("out of file descriptors: %d of the limit of %d in use (one per file or "
                      "directory the kernel holds); lookups fail with ENFILE until the kernel "
                      "forgets some. Raise the limit: LimitNOFILE= in the systemd unit or "
                      "ulimit -n before mounting", in_use, self.fd_limit)
        raise FUSEError(errno.ENFILE)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _entry(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.generation = 0
        entry.entry_timeout = self.options.entry_timeout
        entry.attr_timeout = self.options.attr_timeout
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    def _owner_for(self, parent: Inode, ctx: pyfuse3.RequestContext,
                   parent_mode: int) -> tuple[int, int] | None:
        """(uid, gid) a new object must get so callers own what they create; None: as is."""
        if not self._as_root:
            return None
        gid = -1 if parent_mode & stat.S_ISGID else ctx.gid  # setgid dirs pass on their group
        return ctx.uid, gid

    def _register(self, fd: int, st: os.stat_result, parent: Inode,
                  name: bytes) -> pyfuse3.EntryAttributes:
        inode = self.table.ref(fd, st, parent.ino, name)
        return self._entry(inode.ino, st)

    async def _make(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext,
                    make: Callable[[int, bytes], None]) -> pyfuse3.EntryAttributes:
        """Create a node with ``make(dir_fd, name)``, give it to the caller, register it."""
        parent = self._dir(parent_ino, name)
        self._check_fd_budget()

        def work() -> tuple[int, os.stat_result]:
            parent_mode = os.fstat(parent.fd).st_mode
            make(parent.fd, name)
            fd, st = _open_path(parent.fd, name)
            owner = self._owner_for(parent, ctx, parent_mode)
            try:
                if owner is not None:
                    syscalls.chown_fd(fd, *owner)
                    st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            return fd, st

        fd, st = await self.workers.run(work)
        return self._register(fd, st, parent, name)

    # ----------------------------------------------------------------- lookups
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode, name, errno.ENOENT)
        if name == b"." or (name == b".." and parent is self.table.root):
            st = await self.workers.run(os.fstat, parent.fd)
            parent.nlookup += 1
            return self._entry(parent.ino, st)
        self._check_fd_budget()
        fd, st = await self.workers.run(_open_path, parent.fd, name)
        if name == b"..":  # the NFS-export path: the grandparent keeps its own name
            return self._entry(self.table.ref(fd, st).ino, st)
        return self._register(fd, st, parent, name)

    @fuse_errors
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.table.forget(ino, count)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        st = await self.workers.run(os.fstat, node.fd)
        return self._entry(node.ino, st)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        handle = self.files.get(fh) if fh is not None else None

        def work() -> os.stat_result:
            if fields.update_uid or fields.update_gid:
                syscalls.chown_fd(node.fd, attr.st_uid if fields.update_uid else -1,
                                  attr.st_gid if fields.update_gid else -1)
            if fields.update_size:
                if handle is not None:
                    os.ftruncate(handle.fd, attr.st_size)
                else:
                    os.truncate(node.proc_path, attr.st_size)
            if fields.update_mode:
                if node.is_symlink:
                    raise OSError(errno.EOPNOTSUPP, "symlink modes cannot change")
                os.chmod(node.proc_path, stat.S_IMODE(attr.st_mode))
            if fields.update_atime or fields.update_mtime:
                syscalls.utimens_fd(node.fd,
                                    attr.st_atime_ns if fields.update_atime else None,
                                    attr.st_mtime_ns if fields.update_mtime else None)
            return os.fstat(node.fd)

        st = await self.workers.run(work)
        return self._entry(node.ino, st)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode)
        return await self.workers.run(lambda: os.readlink(b"", dir_fd=node.fd))

    # ------------------------------------------------------------ namespace ops
    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, ctx,
                                lambda d, n: os.mknod(n, mode, rdev, dir_fd=d))

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, ctx,
                                lambda d, n: os.mkdir(n, mode, dir_fd=d))

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, ctx,
                                lambda d, n: os.symlink(target, n, dir_fd=d))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._dir(parent_inode, name)

        def work() -> os.stat_result:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            os.unlink(name, dir_fd=parent.fd)
            return st

        self.unlinked(await self.workers.run(work))

    def unlinked(self, st: os.stat_result) -> None:
        """Hook: a name of the object ``st`` (stat before the unlink) was removed."""

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._dir(parent_inode, name)
        await self.workers.run(lambda: os.rmdir(name, dir_fd=parent.fd))

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old = self._dir(parent_inode_old, name_old)
        new = self._dir(parent_inode_new, name_new)

        def work() -> tuple[list[tuple[os.stat_result, Inode, bytes]], os.stat_result | None]:
            replaced = None
            if not flags & syscalls.RENAME_EXCHANGE:
                try:  # the object the rename is about to unlink, if any
                    replaced = os.stat(name_new, dir_fd=new.fd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
            syscalls.renameat2(old.fd, name_old, new.fd, name_new, flags)
            moved = [(new, name_new)]
            if flags & syscalls.RENAME_EXCHANGE:
                moved.append((old, name_old))
            return [(os.stat(name, dir_fd=parent.fd, follow_symlinks=False), parent, name)
                    for parent, name in moved], replaced

        moved, replaced = await self.workers.run(work)
        for st, parent, name in moved:
            inode = self.table.find(st)
            if inode is not None:
                inode.parent, inode.name = parent.ino, name
        if replaced is not None and (replaced.st_dev, replaced.st_ino) != (
                moved[0][0].st_dev, moved[0][0].st_ino):
            self.unlinked(replaced)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        parent = self._dir(new_parent_inode, new_name)

        def work() -> os.stat_result:
            os.link(node.proc_path, new_name, dst_dir_fd=parent.fd, follow_symlinks=True)
            return os.fstat(node.fd)

        st = await self.workers.run(work)
        node.nlookup += 1  # the kernel counts the new entry as a lookup of this inode
        node.parent, node.name = parent.ino, new_name
        return self._entry(node.ino, st)

    # -------------------------------------------------------------------- files
    def _reopen(self, node: Inode, flags: int) -> int:
        """Open the store object behind an inode for I/O (worker thread)."""
        if node.is_symlink:
            raise OSError(errno.ELOOP, "cannot open a symlink")
        return os.open(node.proc_path, (flags & ~_STRIP_OPEN_FLAGS) | os.O_CLOEXEC)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._inode(inode)
        fd = await self.workers.run(self._reopen, node, flags)
        fh = self._new_fh()
        self.files[fh] = OpenFile(fd, node, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        parent = self._dir(parent_inode, name)
        oflags = (flags & ~_STRIP_OPEN_FLAGS) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC

        def work() -> tuple[int, int, os.stat_result]:
            parent_mode = os.fstat(parent.fd).st_mode
            fd = os.open(name, oflags, mode, dir_fd=parent.fd)
            try:
                owner = self._owner_for(parent, ctx, parent_mode)
                if owner is not None:
                    os.fchown(fd, *owner)
                    if mode & stat.S_ISUID or (mode & stat.S_ISGID and owner[1] != -1):
                        os.fchmod(fd, stat.S_IMODE(mode))  # chown cleared them
                path_fd = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
                return fd, path_fd, os.fstat(path_fd)
            except BaseException:
                os.close(fd)
                raise

        self._check_fd_budget()
        fd, path_fd, st = await self.workers.run(work)
        inode = self.table.ref(path_fd, st, parent.ino, name)
        handle = self._new_handle(fd, inode, flags)
        fh = self._new_fh()
        self.files[fh] = handle
        self.created(handle)
        return (pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False),
                self._entry(inode.ino, st))

    def _new_handle(self, fd: int, node: Inode, flags: int) -> OpenFile:
        """The handle object for a new open file (subclasses keep more state in theirs)."""
        return OpenFile(fd, node, flags)

    def created(self, handle: OpenFile) -> None:
        """Hook: ``create`` opened a new handle (there was no await since the open)."""

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.files[fh]
        return await self.workers.run(pread_full, handle.fd, size, off)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.files[fh]
        return await self.workers.run(os.pwrite, handle.fd, buf, off)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        await self.workers.run(_flush, self.files[fh].fd)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.files.pop(fh)
        await self.workers.run(os.close, handle.fd)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.files[fh]
        await self.workers.run(os.fdatasync if datasync else os.fsync, handle.fd)

    # -------------------------------------------------------------- directories
    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._inode(inode)
        fd = await self.workers.run(
            os.open, node.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fh = self._new_fh()
        self.dirs[fh] = OpenDir(fd, node)
        return fh

    async def _dot_entries(self, handle: OpenDir) -> list[pyfuse3.EntryAttributes]:
        """Attributes for ``.`` and ``..``; these carry no lookup count."""
        node = handle.inode
        at_root = node is self.table.root

        def work() -> tuple[os.stat_result, os.stat_result]:
            st = os.fstat(handle.fd)
            parent_st = st if at_root else os.stat(b"..", dir_fd=handle.fd,
                                                    follow_symlinks=False)
            return st, parent_st

        st, parent_st = await self.workers.run(work)
        parent_ino = node.ino if at_root else self.table.number_for(parent_st)
        return [self._entry(node.ino, st), self._entry(parent_ino, parent_st)]

    def listing_filter(self, handle: OpenDir, names: list[bytes]) -> list[bytes]:
        """Names of a directory to show; a hook for entries the mount hides."""
        return names

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dirs[fh]
        if handle.names is None or start_id == 0:
            names = await self.workers.run(_list_dir, handle.fd)
            handle.names = [b".", b"..", *self.listing_filter(handle, names)]
        names = handle.names
        index = start_id
        if index < 2:
            dots = await self._dot_entries(handle)
            while index < 2:
                if not pyfuse3.readdir_reply(token, names[index], dots[index], index + 1):
                    return
                index += 1
        first = index
        while index < len(names):
            if index > first and self._fd_budget_low():
                return  # the kernel asks again from here; then the check below answers
            self._check_fd_budget()
            batch = names[index:index + _READDIR_BATCH]
            opened = await self.workers.run(_open_paths, handle.fd, batch)
            for pos, (offset, name, fd, st) in enumerate(opened):
                inode = self.table.ref(fd, st, handle.inode.ino, name)
                if not pyfuse3.readdir_reply(token, name, self._entry(inode.ino, st),
                                             index + offset + 1):
                    self.table.forget(inode.ino, 1)
                    for _, _, unused_fd, _ in opened[pos + 1:]:
                        _close_quietly(unused_fd)
                    return
            index += len(batch)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        handle = self.dirs.pop(fh)
        await self.workers.run(os.close, handle.fd)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.workers.run(os.fsync, self.dirs[fh].fd)

    # ---------------------------------------------------------- whole-fs, xattr
    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = await self.workers.run(os.statvfs, self.table.root.fd)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(data, field, getattr(sv, field))
        return data

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        node = self._inode(inode)
        if node.is_symlink:
            raise FUSEError(errno.EPERM)
        node.no_caps_until = 0.0
        await self.workers.run(os.setxattr, node.proc_path, name, value)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode)
        if node.is_symlink:
            raise FUSEError(errno.ENODATA)
        if name == _CAPS_XATTR:
            # The kernel asks for this before every write (to drop file capabilities);
            # a recent "none" is answered from memory instead of a thread hop per write.
            now = time.monotonic()
            if node.no_caps_until > now:
                raise FUSEError(errno.ENODATA)
            try:
                return await self.workers.run(os.getxattr, node.proc_path, name)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    node.no_caps_until = now + self.options.attr_timeout
                raise
        return await self.workers.run(os.getxattr, node.proc_path, name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._inode(inode)
        if node.is_symlink:
            return []
        names = await self.workers.run(os.listxattr, node.proc_path)
        return [os.fsencode(n) for n in names]

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._inode(inode)
        if node.is_symlink:
            raise FUSEError(errno.ENODATA)
        node.no_caps_until = 0.0
        await self.workers.run(os.removexattr, node.proc_path, name)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # With default_permissions (always on) the kernel decides access itself from
        # the attributes we report and never asks; answer consistently if it does.
        self._inode(inode)
        return True
