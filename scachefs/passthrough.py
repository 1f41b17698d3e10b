"""The passthrough filesystem: SOURCE re-exported at MOUNTPOINT with the store's semantics.

Modelled on libfuse's passthrough_hp: an inode table of O_PATH descriptors, every
access relative to them, lookup counts released on forget. Every blocking call
runs in a worker thread (:mod:`scachefs.workers`); handlers only dispatch.
Errors from the store reach the caller with the store's errno.

Files are handed to the kernel where it can do their I/O itself (FUSE
passthrough, Linux 6.9+): the open registers the store file as the backing file
of its inode and the kernel reads and writes it without asking us. The kernel
allows one backing file per inode while it has opens, and no passthrough open
beside an open that uses its page cache (a "cached" open), so each inode counts
its opens of both kinds; the backing file is closed at the last release.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import resource
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

from scachefs import creds, locks, resend, syscalls
from scachefs.fuse import abi
from scachefs.fuse.ops import (
    Attr,
    Entry,
    FuseError,
    Lock,
    Opened,
    Operations,
    Request,
    SetAttr,
)
from scachefs.fuse.session import DirBuffer, Session
from scachefs.inodes import Inode, InodeTable
from scachefs.keeper import Keeper
from scachefs.options import MountOptions
from scachefs.takeover import KIND_CACHED, KIND_PASSTHROUGH, Journal
from scachefs.workers import WorkerPool

log = logging.getLogger(__name__)
T = TypeVar("T")

# Flags that make no sense when the daemon reopens an existing object for a caller.
# O_NOFOLLOW: the kernel already resolved the name without following it, and the
# reopen goes through /proc/self/fd/N, a magic link that O_NOFOLLOW refuses (ELOOP).
# O_APPEND: every WRITE the kernel sends carries its offset (the kernel places an
# appending write at the end itself), and pwrite on an O_APPEND descriptor ignores
# the offset: a page written back through a shared mapping would land at the end.
_STRIP_OPEN_FLAGS = (os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW
                     | os.O_APPEND)
_READDIR_BATCH = 32
FD_RESERVE = 32  # descriptors kept free for opens, store reads and traces (at least)
FD_BASELINE = 16  # descriptors of the process itself: stdio, /dev/fuse, the trace dir, ...
_CAPS_XATTR = b"security.capability"
# Errors an operator must hear about (the caller gets them too); ENOENT & co. are normal.
_STORE_TROUBLE = frozenset({errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ESTALE,
                            errno.ENOTCONN, errno.ETIMEDOUT})
_ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
# INIT flags a passthrough of a directory tree wants from the kernel. No export support
# (NO_EXPORT_SUPPORT): a handle would resolve by node id alone once the kernel forgot the
# inode, and our node ids are store inode numbers, which the store reuses. POSIX_ACL:
# the kernel checks the store's ACLs itself (it asks for system.posix_acl_access); with
# DONT_MASK it leaves the umask to us, which a create done as the caller with the
# request's umask applies exactly as the store does: ignored where the parent has a
# default ACL. CREATE_SUPP_GROUP: creates carry the parent's group when the caller
# is in it; SETXATTR_EXT: the kernel says when an ACL change must drop setgid.
_WANTED = (abi.NO_EXPORT_SUPPORT | abi.DO_READDIRPLUS | abi.READDIRPLUS_AUTO
           | abi.AUTO_INVAL_DATA | abi.HANDLE_KILLPRIV_V2 | abi.POSIX_LOCKS | abi.FLOCK_LOCKS
           | abi.POSIX_ACL | abi.DONT_MASK | abi.SETXATTR_EXT | abi.CREATE_SUPP_GROUP)


@dataclasses.dataclass(eq=False)
class OpenFile:
    """An open file handle: our own descriptor of the store file."""

    fd: int
    inode: Inode
    flags: int
    backing_id: int = 0  # the kernel does this handle's I/O (passthrough)
    cached: bool = False  # served by us through the kernel's page cache
    # POSIX/OFD lock owners that took locks through this open file (see locks.py).
    lock_owners: set[int] = dataclasses.field(default_factory=set)

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_RDONLY


@dataclasses.dataclass(eq=False)
class OpenDir:
    """An open directory handle with the listing taken at the first readdir."""

    fd: int
    inode: Inode
    names: list[tuple[bytes, int, int]] | None = None  # (name, d_ino, file type bits)


def _empty_dir(dir_fd: int, name: bytes) -> bool:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    try:
        return not os.listdir(fd)
    finally:
        os.close(fd)


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


def _file_type(entry: os.DirEntry[str]) -> int:
    """The S_IFMT bits from the directory entry's d_type (0 if the store did not say)."""
    try:
        if entry.is_symlink():
            return stat.S_IFLNK
        if entry.is_dir(follow_symlinks=False):
            return stat.S_IFDIR
        if entry.is_file(follow_symlinks=False):
            return stat.S_IFREG
    except OSError:
        pass
    return 0


def _list_dir(fd: int) -> list[tuple[bytes, int, int]]:
    """(name, inode number, type bits) of every entry, from getdents alone (blocking)."""
    with os.scandir(fd) as entries:
        return [(os.fsencode(e.name), e.inode(), _file_type(e)) for e in entries]


def _flush(fd: int) -> None:
    """close(dup(fd)): lets stores such as NFS report write-back errors at close."""
    os.close(os.dup(fd))


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _kill_suidgid(fd: int) -> bool:
    """Drop setuid, and setgid if group-executable, as a write by an unprivileged caller
    must; whether the mode changed."""
    mode = os.fstat(fd).st_mode
    kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
    if mode & kill:
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode) & ~kill)
        return True
    return False


_CAP_SYS_ADMIN = 21


def _caller_has_sys_admin(pid: int) -> bool:
    """Whether a caller holds CAP_SYS_ADMIN in our user namespace, as the store's
    ``capable(CAP_SYS_ADMIN)`` would see it (blocking: /proc). False if it is gone."""
    try:
        if os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino:
            return False  # capabilities in a user namespace of its own do not count
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


class Passthrough(Operations):
    """All FUSE operations as a passthrough of the store directory."""

    def __init__(self, root_fd: int, options: MountOptions) -> None:
        self.options = options
        self.table = InodeTable(root_fd, os.fstat(root_fd))
        self.workers = WorkerPool(options.threads)
        self.files: dict[int, OpenFile] = {}
        self.dirs: dict[int, OpenDir] = {}
        self.session: Session | None = None  # set before the session serves
        self._next_fh = 1
        self._as_root = os.geteuid() == 0
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_warned = -10.0
        self.hidden: frozenset[bytes] = frozenset()  # names at the root the mount hides
        # Why the kernel cannot do our files' I/O (None: it can), and per store device.
        self.passthrough_off: str | None = None
        self._passthrough_off_dev: dict[int, str] = {}
        self._trouble_logged: dict[tuple[str, int], tuple[float, int]] = {}
        # Reads and writes of plain files that reached the daemon (with passthrough: none).
        self.daemon_io = {"reads": 0, "read_bytes": 0, "writes": 0, "write_bytes": 0}
        self.journal: Journal | None = None  # with a holder: the state a successor restores
        self.keeper: Keeper | None = None  # with a holder: it pins our open files

    def use_journal(self, journal: Journal) -> None:
        """Write every table change to the state a restarted daemon takes over."""
        self.journal = journal
        journal.fs = self
        self.table.changed = journal.node
        self.table.gone = journal.node_gone

    # ----------------------------------------------------------------- session
    def init(self, capable: int) -> int:
        want = _WANTED
        if self.options.passthrough == "off":
            self.passthrough_off = "switched off (passthrough=off)"
        elif not capable & abi.PASSTHROUGH:
            self.passthrough_off = ("the kernel does not offer FUSE passthrough (Linux 6.9 or "
                                    "newer with CONFIG_FUSE_PASSTHROUGH is needed)")
        elif not self._as_root:
            self.passthrough_off = ("registering backing files needs CAP_SYS_ADMIN (run the "
                                    "daemon as root)")
        else:
            want |= abi.PASSTHROUGH
        if self.passthrough_off and self.options.passthrough == "on":
            raise ConnectionError(f"passthrough=on, but passthrough is unavailable: "
                                  f"{self.passthrough_off}")
        if self.passthrough_off:
            log.warning("passthrough unavailable: %s; the daemon serves every read and write",
                        self.passthrough_off)
        return want

    def failed(self, op: str, exc: OSError) -> None:
        """A handler failed with a store error: log it, at most every 10 s per kind."""
        if exc.errno not in _STORE_TROUBLE:
            return
        key = (op, exc.errno or 0)
        now = time.monotonic()
        last, suppressed = self._trouble_logged.get(key, (-10.0, 0))
        if now - last < 10:
            self._trouble_logged[key] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more like it since the last report)" if suppressed else ""
        log.warning("%s failed in the store: %s%s", op, exc, more)
        self._trouble_logged[key] = (now, 0)

    # ----------------------------------------------------------------- helpers
    def _inode(self, ino: int) -> Inode:
        inode = self.table.get(ino)
        if inode is None:
            raise FuseError(errno.ESTALE)
        return inode

    def _dir(self, ino: int, name: bytes, err: int = errno.EPERM) -> Inode:
        """The parent directory of ``name``; refuses the names the mount hides."""
        parent = self._inode(ino)
        if name in self.hidden and parent is self.table.root:
            raise FuseError(err)
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
        raise FuseError(errno.ENFILE)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _shown_ino(self, nodeid: int, st: os.stat_result) -> int:
        """The number stat(2) shows: the store's own, unless it could be confused."""
        if nodeid == self.table.root.ino or st.st_dev != self.table.root_dev:
            return nodeid  # the root is 1; other devices could repeat the store's numbers
        return st.st_ino

    def _entry(self, ino: int, st: os.stat_result) -> Entry:
        return Entry(ino, st, self._shown_ino(ino, st), 0, self.options.entry_timeout,
                     self._attr_timeout(st))

    def _attr(self, ino: int, st: os.stat_result) -> Attr:
        return Attr(st, self._shown_ino(ino, st), self._attr_timeout(st))

    def _attr_timeout(self, st: os.stat_result) -> float:
        """How long the kernel may keep these attributes.

        Not at all for a setuid or setgid file: the kernel writes passthrough files
        without telling us, and such a write makes the store drop the bits, which the
        kernel's cached mode would go on showing (these files are rare; each stat of
        one costs a GETATTR)."""
        if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            return 0.0
        return self.options.attr_timeout

    def _caller(self, req: Request, groups: bool = True) -> creds.Caller | None:
        """The credentials a store call acts with for ``req`` (None: the daemon's own)."""
        if not self._as_root:
            return None
        return creds.Caller(req.uid, req.gid, req.groups if groups else ())

    def _register(self, fd: int, st: os.stat_result, parent: Inode, name: bytes) -> Entry:
        inode = self.table.ref(fd, st, parent.ino, name)
        return self._entry(inode.ino, st)

    async def _make(self, parent_ino: int, name: bytes, req: Request,
                    make: Callable[[int, bytes], None],
                    made: Callable[[int, bytes, os.stat_result], bool]) -> Entry:
        """Create a node with ``make(dir_fd, name)`` as the caller, register it.

        ``made(dir_fd, name, st)``: whether the object found under the name is what
        this request makes (a resent request the dead daemon did: resend.py)."""
        parent = self._dir(parent_ino, name)
        self._check_fd_budget()

        caller = self._caller(req)

        def work() -> tuple[int, os.stat_result]:
            # As the caller: the store decides owner, group, setgid, default ACL and
            # umask, and checks the directory, exactly as for a local mkdir or mknod.
            try:
                with creds.acting_as(caller, req.umask):
                    make(parent.fd, name)
            except FileExistsError:
                if not req.resent:
                    raise
                fd, st = _open_path(parent.fd, name)
                if not made(parent.fd, name, st):
                    os.close(fd)
                    raise
                return fd, st
            return _open_path(parent.fd, name)

        fd, st = await self.workers.run(work)
        return self._register(fd, st, parent, name)

    # ------------------------------------------------------------ passthrough
    def _give_to_kernel(self, handle: OpenFile, st: os.stat_result) -> bool:
        """Let the kernel do this handle's I/O (passthrough); False: we serve it.

        Called without an await between the decision and the reply: the per-inode
        counts then always match what the kernel was told.
        """
        node = handle.inode
        st_dev = st.st_dev
        if node.backing_id == 0:
            session = self.session
            if (session is None or not session.passthrough or self.passthrough_off
                    or node.cached_opens or st_dev in self._passthrough_off_dev):
                return False
            try:
                # Registered without CAP_FSETID: the kernel does every passthrough write
                # with these credentials, so a write drops setuid/setgid on the store
                # (see creds.without_fsetid).
                with creds.without_fsetid():
                    node.backing_id = session.backing_open(handle.fd)
            except OSError as exc:
                self._passthrough_failed(exc, st_dev)
                return False
        node.passthrough_opens += 1
        handle.backing_id = node.backing_id
        return True

    def _passthrough_failed(self, exc: OSError, st_dev: int) -> None:
        if exc.errno == errno.EPERM:
            self.passthrough_off = ("registering a backing file needs CAP_SYS_ADMIN (run the "
                                    "daemon as root)")
            log.warning("passthrough unavailable: %s; the daemon serves every read and write",
                        self.passthrough_off)
        else:
            reason = f"the store's file system refuses backing files: {exc.strerror}"
            self._passthrough_off_dev[st_dev] = reason
            log.warning("passthrough unavailable for files on device %d:%d: %s; the daemon "
                        "serves their reads and writes", os.major(st_dev), os.minor(st_dev),
                        reason)

    def _serve_ourselves(self, handle: OpenFile, direct_io: bool) -> None:
        """Count a handle we serve; one without direct I/O uses the kernel's page cache."""
        if not direct_io:
            handle.cached = True
            handle.inode.cached_opens += 1

    def _closed(self, handle: OpenFile) -> None:
        """Undo a handle's counts; the backing file goes with the inode's last passthrough open."""
        node = handle.inode
        if handle.cached:
            handle.cached = False
            node.cached_opens -= 1
        if handle.backing_id:
            handle.backing_id = 0
            node.passthrough_opens -= 1
            if node.passthrough_opens == 0 and node.backing_id:
                backing_id, node.backing_id = node.backing_id, 0
                if self.session is not None:
                    try:
                        self.session.backing_close(backing_id)
                    except OSError as exc:
                        log.warning("cannot close backing file %d: %s", backing_id, exc)

    def _opened(self, handle: OpenFile, st: os.stat_result) -> Opened:
        """Register an open handle; the kernel does its I/O if it can."""
        if self._give_to_kernel(handle, st):
            fh = self._register_file(handle)
            return Opened(fh, backing_id=handle.backing_id, noflush=not handle.writable)
        direct = self._direct_io(handle)
        self._serve_ourselves(handle, direct)
        return Opened(self._register_file(handle), direct_io=direct, noflush=not handle.writable)

    def file_kind(self, handle: OpenFile) -> int:
        """How a handle is served, as the state records it (takeover.KIND_*)."""
        return (KIND_CACHED if handle.cached else 0) | (
            KIND_PASSTHROUGH if handle.backing_id else 0)

    def _register_file(self, handle: OpenFile) -> int:
        """A new fh for an open handle, journalled before the kernel learns it."""
        fh = self._new_fh()
        self.files[fh] = handle
        if self.journal is not None:
            self.journal.file(fh, handle, self.file_kind(handle))
        if self.keeper is not None:  # the holder pins the file should we die
            self.keeper.keep(fh, handle.fd)
        return fh

    def _unregister_file(self, fh: int) -> OpenFile | None:
        """The handle of ``fh``, forgotten; None if unknown (a RELEASE resent after a
        takeover, whose first delivery the previous daemon handled before it died)."""
        handle = self.files.pop(fh, None)
        if handle is not None and self.journal is not None:
            self.journal.file_gone(fh)
        if handle is not None and self.keeper is not None:
            self.keeper.drop(fh)
        return handle

    def _adopt_dir(self, fh: int, fd: int, node: Inode) -> None:
        """A directory handle a previous daemon opened (takeover)."""
        self.dirs[fh] = OpenDir(fd, node)

    def _direct_io(self, handle: OpenFile) -> bool:
        """Whether a handle we serve bypasses the kernel's page cache (FOPEN_DIRECT_IO).

        O_DIRECT callers bypass it anyway; saying so keeps the inode out of the
        kernel's caching mode, so that a passthrough open can still join it.
        """
        return bool(handle.flags & os.O_DIRECT)

    # ----------------------------------------------------------------- lookups
    async def lookup(self, parent: int, name: bytes, req: Request) -> Entry:
        node = self._dir(parent, name, errno.ENOENT)
        if name == b"." or (name == b".." and node is self.table.root):
            st = await self.workers.run(os.fstat, node.fd)
            node.nlookup += 1
            self.table.changed(node)
            return self._entry(node.ino, st)
        self._check_fd_budget()
        fd, st = await self.workers.run(_open_path, node.fd, name)
        if name == b"..":  # the NFS-export path: the grandparent keeps its own name
            return self._entry(self.table.ref(fd, st).ino, st)
        return self._register(fd, st, node, name)

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        for ino, count in items:
            self.table.forget(ino, count)

    async def getattr(self, nodeid: int, fh: int | None, req: Request) -> Attr:
        node = self._inode(nodeid)
        st = await self.workers.run(os.fstat, node.fd)
        return self._attr(node.ino, st)

    async def setattr(self, nodeid: int, changes: SetAttr, req: Request) -> Attr:
        node = self._inode(nodeid)
        handle = self.files.get(changes.fh) if changes.fh is not None else None

        def work() -> os.stat_result:
            if changes.uid is not None or changes.gid is not None:
                syscalls.chown_fd(node.fd, -1 if changes.uid is None else changes.uid,
                                  -1 if changes.gid is None else changes.gid)
            if changes.size is not None:
                if handle is not None:
                    os.ftruncate(handle.fd, changes.size)
                else:
                    os.truncate(node.proc_path, changes.size)
            if changes.mode is not None:
                if node.is_symlink:
                    raise OSError(errno.EOPNOTSUPP, "symlink modes cannot change")
                os.chmod(node.proc_path, stat.S_IMODE(changes.mode))
            elif changes.kill_suidgid and not node.is_symlink:
                # FUSE_HANDLE_KILLPRIV_V2: a truncate or chown by an unprivileged caller
                st = os.fstat(node.fd)
                kill = stat.S_ISUID | (stat.S_ISGID if st.st_mode & stat.S_IXGRP else 0)
                if st.st_mode & kill and stat.S_ISREG(st.st_mode):
                    os.chmod(node.proc_path, stat.S_IMODE(st.st_mode) & ~kill)
            if (changes.atime_ns is not None or changes.mtime_ns is not None
                    or changes.atime_now or changes.mtime_now):
                syscalls.utimens_fd(node.fd, changes.atime_ns, changes.mtime_ns,
                                    atime_now=changes.atime_now, mtime_now=changes.mtime_now)
            return os.fstat(node.fd)

        st = await self.workers.run(work)
        return self._attr(node.ino, st)

    async def readlink(self, nodeid: int, req: Request) -> bytes:
        node = self._inode(nodeid)
        return await self.workers.run(lambda: os.readlink(b"", dir_fd=node.fd))

    # ------------------------------------------------------------ namespace ops
    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
                    req: Request) -> Entry:
        def made(d: int, n: bytes, st: os.stat_result) -> bool:
            return (resend.made_by_caller(st, req.uid, stat.S_IFMT(mode))
                    and ((not stat.S_ISCHR(mode) and not stat.S_ISBLK(mode))
                         or st.st_rdev == rdev))

        return await self._make(parent, name, req,
                                lambda d, n: os.mknod(n, mode, rdev, dir_fd=d), made)

    async def mkdir(self, parent: int, name: bytes, mode: int, req: Request) -> Entry:
        def made(d: int, n: bytes, st: os.stat_result) -> bool:
            return resend.made_by_caller(st, req.uid, stat.S_IFDIR) and _empty_dir(d, n)

        return await self._make(parent, name, req,
                                lambda d, n: os.mkdir(n, mode, dir_fd=d), made)

    async def symlink(self, parent: int, name: bytes, target: bytes, req: Request) -> Entry:
        def made(d: int, n: bytes, st: os.stat_result) -> bool:
            return (resend.made_by_caller(st, req.uid, stat.S_IFLNK)
                    and os.readlink(n, dir_fd=d) == target)

        return await self._make(parent, name, req,
                                lambda d, n: os.symlink(target, n, dir_fd=d), made)

    async def unlink(self, parent: int, name: bytes, req: Request) -> None:
        node = self._dir(parent, name)

        def work() -> os.stat_result | None:
            try:
                st = os.stat(name, dir_fd=node.fd, follow_symlinks=False)
                os.unlink(name, dir_fd=node.fd)
            except FileNotFoundError:
                if req.resent:
                    return None  # the dead daemon removed it (resend.py)
                raise
            return st

        st = await self.workers.run(work)
        if st is not None:
            self.unlinked(st)

    def unlinked(self, st: os.stat_result) -> None:
        """Hook: a name of the object ``st`` (stat before the unlink) was removed."""

    async def rmdir(self, parent: int, name: bytes, req: Request) -> None:
        node = self._dir(parent, name)

        def work() -> None:
            try:
                os.rmdir(name, dir_fd=node.fd)
            except FileNotFoundError:
                if not req.resent:  # else the dead daemon removed it (resend.py)
                    raise

        await self.workers.run(work)

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
                     flags: int, req: Request) -> None:
        old = self._dir(parent, name)
        new = self._dir(new_parent, new_name)
        # Resent: the object the kernel knew under the old name, or (when the dead daemon
        # had also recorded the move) the one our table already has under the new name.
        source = ((self.table.child(old.ino, name) or self.table.child(new.ino, new_name))
                  if req.resent else None)

        def work() -> tuple[list[tuple[os.stat_result, Inode, bytes]], os.stat_result | None]:
            replaced = None
            if not flags & syscalls.RENAME_EXCHANGE:
                try:  # the object the rename is about to unlink, if any
                    replaced = os.stat(new_name, dir_fd=new.fd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
            try:
                syscalls.renameat2(old.fd, name, new.fd, new_name, flags)
            except FileNotFoundError:
                # Resent: done if the object the kernel knew under the old name is now
                # under the new one (resend.py).
                st = os.stat(new_name, dir_fd=new.fd, follow_symlinks=False)
                if not (req.resent and source is not None
                        and (st.st_dev, st.st_ino) == source.key):
                    raise
                replaced = None
            moved = [(new, new_name)]
            if flags & syscalls.RENAME_EXCHANGE:
                moved.append((old, name))
            return [(os.stat(n, dir_fd=p.fd, follow_symlinks=False), p, n)
                    for p, n in moved], replaced

        moved, replaced = await self.workers.run(work)
        for st, p, n in moved:
            inode = self.table.find(st)
            if inode is not None:
                inode.parent, inode.name = p.ino, n
                self.table.changed(inode)
        if replaced is not None and (replaced.st_dev, replaced.st_ino) != (
                moved[0][0].st_dev, moved[0][0].st_ino):
            self.unlinked(replaced)

    async def link(self, nodeid: int, new_parent: int, new_name: bytes,
                   req: Request) -> Entry:
        node = self._inode(nodeid)
        parent = self._dir(new_parent, new_name)

        def work() -> os.stat_result:
            try:
                os.link(node.proc_path, new_name, dst_dir_fd=parent.fd, follow_symlinks=True)
            except FileExistsError:
                st = os.stat(new_name, dir_fd=parent.fd, follow_symlinks=False)
                if not req.resent or (st.st_dev, st.st_ino) != node.key:
                    raise  # else the dead daemon made this link (resend.py)
            return os.fstat(node.fd)

        st = await self.workers.run(work)
        node.nlookup += 1  # the kernel counts the new entry as a lookup of this inode
        node.parent, node.name = parent.ino, new_name
        self.table.changed(node)
        return self._entry(node.ino, st)

    # -------------------------------------------------------------------- files
    def _reopen(self, node: Inode, flags: int) -> tuple[int, os.stat_result]:
        """Open the store object behind an inode for I/O (worker thread)."""
        if node.is_symlink:
            raise OSError(errno.ELOOP, "cannot open a symlink")
        fd = os.open(node.proc_path, (flags & ~_STRIP_OPEN_FLAGS) | os.O_CLOEXEC)
        try:
            return fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise

    def _new_handle(self, fd: int, node: Inode, flags: int) -> OpenFile:
        """The handle object for a new open file (subclasses keep more state in theirs)."""
        return OpenFile(fd, node, flags)

    async def open(self, nodeid: int, flags: int, req: Request) -> Opened:
        node = self._inode(nodeid)
        fd, st = await self.workers.run(self._reopen, node, flags)
        return self._opened(self._new_handle(fd, node, flags), st)

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     req: Request) -> tuple[Entry, Opened]:
        node = self._dir(parent, name)
        # O_EXCL stays: a name that appeared since the kernel's lookup is opened only as
        # the store lets the caller open it (or refused, EEXIST), never given away.
        oflags = ((flags & ~(_STRIP_OPEN_FLAGS & ~os.O_EXCL)) | os.O_CREAT | os.O_NOFOLLOW
                  | os.O_CLOEXEC)
        caller = self._caller(req)

        def work() -> tuple[int, int, os.stat_result]:
            with creds.acting_as(caller, req.umask):
                try:
                    fd = os.open(name, oflags, mode, dir_fd=node.fd)
                except FileExistsError:
                    # Resent: the dead daemon created it if the caller's empty file made
                    # just now is there (resend.py); open that one.
                    if not req.resent:
                        raise
                    st = os.stat(name, dir_fd=node.fd, follow_symlinks=False)
                    if not (resend.made_by_caller(st, req.uid, stat.S_IFREG)
                            and st.st_size == 0):
                        raise
                    fd = os.open(name, oflags & ~(os.O_CREAT | os.O_EXCL), dir_fd=node.fd)
            try:
                path_fd = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
                return fd, path_fd, os.fstat(path_fd)
            except BaseException:
                os.close(fd)
                raise

        self._check_fd_budget()
        fd, path_fd, st = await self.workers.run(work)
        inode = self.table.ref(path_fd, st, node.ino, name)
        handle = self._new_handle(fd, inode, flags)
        self.created(handle)
        return self._entry(inode.ino, st), self._opened(handle, st)

    def created(self, handle: OpenFile) -> None:
        """Hook: ``create`` opened a new handle (there was no await since the open)."""

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self.files[fh]
        data = await self.workers.run(pread_full, handle.fd, size, offset)
        self.daemon_io["reads"] += 1
        self.daemon_io["read_bytes"] += len(data)
        return data

    async def write(self, fh: int, offset: int, data: bytes, kill_suidgid: bool) -> int:
        handle = self.files[fh]

        def work() -> int:
            written = os.pwrite(handle.fd, data, offset)
            if kill_suidgid and _kill_suidgid(handle.fd):
                self._attrs_changed(handle.inode)
            return written

        written = await self.workers.run(work)
        self.daemon_io["writes"] += 1
        self.daemon_io["write_bytes"] += written
        return written

    async def flush(self, fh: int, lock_owner: int = 0) -> None:
        handle = self.files[fh]
        owners = handle.lock_owners
        if lock_owner in owners:  # a POSIX owner closed a descriptor: its locks go
            owners.discard(lock_owner)
            if not owners:
                await self.workers.run(locks.unlock_all, handle.fd)
        await self.workers.run(_flush, handle.fd)

    # ------------------------------------------------------------------ locks
    async def getlk(self, fh: int, owner: int, lock: Lock) -> Lock:
        handle = self.files[fh]
        if lock.flock:  # flock() has no F_GETLK
            return Lock(fcntl.F_UNLCK, lock.start, lock.end)
        ltype, start, end, pid = await self.workers.run(locks.get, handle.fd, lock.type,
                                                        lock.start, lock.end)
        return Lock(ltype, start, end, pid)

    async def setlk(self, fh: int, owner: int, lock: Lock, wait: bool) -> None:
        """The lock on the store, through this open file's own descriptor (locks.py);
        a wait polls (backing off to 50 ms) so that no worker thread is held by it."""
        handle = self.files[fh]
        if lock.type != fcntl.F_UNLCK and not lock.flock:
            handle.lock_owners.add(owner)
        delay = 0.001
        while True:
            try:
                if lock.flock:
                    await self.workers.run(locks.set_flock, handle.fd, lock.type)
                else:
                    await self.workers.run(locks.set_range, handle.fd, lock.type, lock.start,
                                           lock.end)
                return
            except OSError as exc:
                if not wait or exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def release(self, fh: int) -> None:
        handle = self._unregister_file(fh)
        if handle is None:
            return
        self._closed(handle)
        await self.workers.run(os.close, handle.fd)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.files[fh]
        await self.workers.run(os.fdatasync if datasync else os.fsync, handle.fd)

    async def fallocate(self, fh: int, offset: int, length: int, mode: int,
                        req: Request) -> None:
        handle = self.files[fh]
        caller = self._caller(req, groups=False)

        def work() -> None:
            # As the caller: the store drops setuid/setgid as for the caller's own
            # fallocate (root keeps them, as root does on the store).
            with creds.acting_as(caller):
                syscalls.fallocate(handle.fd, mode, offset, length)

        await self.workers.run(self._mode_watched, handle, work)

    def _mode_watched(self, handle: OpenFile, work: Callable[[], T]) -> T:
        """``work()``, then the kernel's attributes of the handle's inode dropped if it
        changed the mode (a write that cleared setuid/setgid). Worker thread."""
        before = os.fstat(handle.fd).st_mode
        result = work()
        if os.fstat(handle.fd).st_mode != before:
            self._attrs_changed(handle.inode)
        return result

    def _attrs_changed(self, node: Inode) -> None:
        """Make the kernel fetch a node's attributes (and ACLs) again (worker thread).

        The kernel keeps a mode for ``attr_timeout``; after the store changed it
        behind a request that does not return attributes (setuid dropped by a
        write, an ACL or system.* xattr set), it would go on showing the old one.
        """
        if self.session is not None:
            self.session.notify_inval_inode(node.ino, -1, 0)  # offset -1: no page cache

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        handle = self.files[fh]
        return await self.workers.run(os.lseek, handle.fd, offset, whence)

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                              length: int, flags: int, req: Request) -> int:
        src, dst = self.files[fh_in], self.files[fh_out]
        caller = self._caller(req, groups=False)

        def work() -> int:
            with creds.acting_as(caller):  # the store drops setuid/setgid as for the caller
                return os.copy_file_range(src.fd, dst.fd, length, off_in, off_out)

        return await self.workers.run(self._mode_watched, dst, work)

    # -------------------------------------------------------------- directories
    async def opendir(self, nodeid: int, req: Request) -> int:
        node = self._inode(nodeid)
        fd = await self.workers.run(
            os.open, node.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fh = self._new_fh()
        self.dirs[fh] = OpenDir(fd, node)
        if self.journal is not None:
            self.journal.dir(fh, node)
        return fh

    async def _dot_entries(self, handle: OpenDir) -> list[tuple[int, os.stat_result]]:
        """(shown number, stat) of ``.`` and ``..``; these carry no lookup count."""
        node = handle.inode
        at_root = node is self.table.root

        def work() -> tuple[os.stat_result, os.stat_result]:
            st = os.fstat(handle.fd)
            parent_st = st if at_root else os.stat(b"..", dir_fd=handle.fd,
                                                    follow_symlinks=False)
            return st, parent_st

        st, parent_st = await self.workers.run(work)
        parent_ino = node.ino if at_root else self.table.number_for(parent_st)
        return [(self._shown_ino(node.ino, st), st),
                (self._shown_ino(parent_ino, parent_st) if parent_ino else 0, parent_st)]

    def listing_filter(self, handle: OpenDir, names: list[tuple[bytes, int, int]]
                       ) -> list[tuple[bytes, int, int]]:
        """Entries of a directory to show; a hook for entries the mount hides."""
        return names

    async def readdir(self, fh: int, offset: int, out: DirBuffer) -> None:
        handle = self.dirs[fh]
        if handle.names is None or offset == 0:
            listing = await self.workers.run(_list_dir, handle.fd)
            handle.names = [(b".", 0, stat.S_IFDIR), (b"..", 0, stat.S_IFDIR),
                            *self.listing_filter(handle, listing)]
        names = handle.names
        index = offset
        if index < 2:
            dots = await self._dot_entries(handle)
            while index < 2:
                shown, st = dots[index]
                if not out.add(names[index][0], index + 1, shown, stat.S_IFDIR):
                    return
                index += 1
        if not out.plus:
            while index < len(names):
                name, d_ino, kind = names[index]
                if not out.add(name, index + 1, d_ino, kind):
                    return
                index += 1
            return
        while index < len(names):
            if self._fd_budget_low():
                # Out of descriptors: plain entries (no lookup, no descriptor) keep the
                # listing whole; lookups of them then answer ENFILE, logged.
                name, d_ino, kind = names[index]
                if not out.add(name, index + 1, d_ino, kind):
                    return
                index += 1
                continue
            batch = [n for n, _, _ in names[index:index + _READDIR_BATCH]]
            opened = await self.workers.run(_open_paths, handle.fd, batch)
            for pos, (rel, name, fd, st) in enumerate(opened):
                inode = self.table.ref(fd, st, handle.inode.ino, name)
                entry = self._entry(inode.ino, st)
                if not out.add(name, index + rel + 1, entry.ino, st.st_mode, entry):
                    self.table.forget(inode.ino, 1)
                    for _, _, unused_fd, _ in opened[pos + 1:]:
                        _close_quietly(unused_fd)
                    return
            index += len(batch)

    async def releasedir(self, fh: int) -> None:
        handle = self.dirs.pop(fh, None)
        if handle is None:
            return  # resent after a takeover, handled before (see _unregister_file)
        if self.journal is not None:
            self.journal.dir_gone(fh)
        await self.workers.run(os.close, handle.fd)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.workers.run(os.fsync, self.dirs[fh].fd)

    # ---------------------------------------------------------- whole-fs, xattr
    # xattrs go through /proc/self/fd/N of the node's O_PATH descriptor: the magic
    # link resolves to the object itself, a symlink included, which is never
    # followed (the l*xattr calls would act on the magic link instead). The store
    # then answers as for lsetxattr & co. on it: trusted.* and security.* work on a
    # symlink for root, user.* is refused (EPERM) as Linux refuses it everywhere.
    async def statfs(self, nodeid: int, req: Request) -> os.statvfs_result:
        return await self.workers.run(os.statvfs, self.table.root.fd)

    async def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int,
                       req: Request) -> None:
        node = self._inode(nodeid)
        node.no_caps_until = node.no_acl_until = 0.0
        await self.workers.run(self._xattr_change, node, name, req,
                               lambda: os.setxattr(node.proc_path, name, value, flags))

    def _xattr_change(self, node: Inode, name: bytes, req: Request,
                      change: Callable[[], None]) -> None:
        """Set or remove an xattr with the checks the store would make (worker thread).

        The kernel checks user.*, trusted.* and security.* names, and POSIX ACLs
        (owner only), itself before it asks; the store then applies them as root. Other
        system.* names (system.nfs4_acl, ...) reach us unchecked: the store must
        decide, so they are changed as the caller (fsuid/fsgid, no capabilities).
        """
        if name in _ACL_XATTRS:
            change()
            if req.acl_kill_sgid and not node.is_symlink:
                # The kernel found the caller outside the file's group (with all of
                # its groups, which we do not have): setgid goes, as on the store.
                mode = os.fstat(node.fd).st_mode
                if mode & stat.S_ISGID:
                    os.chmod(node.proc_path, stat.S_IMODE(mode) & ~stat.S_ISGID)
            self._attrs_changed(node)
        elif name.startswith(b"system."):
            with creds.acting_as(self._caller(req, groups=False)):
                change()
            self._attrs_changed(node)
        else:
            change()

    def getxattr_now(self, nodeid: int, name: bytes) -> bytes | int | None:
        # The kernel asks for security.capability before writes (to drop file
        # capabilities) and for the access ACL at permission checks (FUSE_POSIX_ACL);
        # a recent "none" is answered on the read loop.
        if name == _CAPS_XATTR:
            node = self.table.get(nodeid)
            if node is not None and node.no_caps_until > time.monotonic():
                return errno.ENODATA
        elif name == _ACL_XATTRS[0]:
            node = self.table.get(nodeid)
            if node is not None and node.no_acl_until > time.monotonic():
                return errno.ENODATA
        return None

    async def getxattr(self, nodeid: int, name: bytes, req: Request) -> bytes:
        node = self._inode(nodeid)
        try:
            value: bytes = await self.workers.run(os.getxattr, node.proc_path, name)
        except OSError as exc:
            if name == _CAPS_XATTR and exc.errno == errno.ENODATA:
                node.no_caps_until = time.monotonic() + self.options.attr_timeout
            if name in _ACL_XATTRS and exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
                if name == _ACL_XATTRS[0]:
                    node.no_acl_until = time.monotonic() + self.options.attr_timeout
                # A store without ACLs: "no ACL", or the kernel (FUSE_POSIX_ACL) would
                # fail every permission check on the mode bits with EOPNOTSUPP.
                raise FuseError(errno.ENODATA) from None
            raise
        return value

    async def listxattr(self, nodeid: int, req: Request) -> list[bytes]:
        node = self._inode(nodeid)

        def work() -> list[bytes]:
            names = [os.fsencode(n) for n in os.listxattr(node.proc_path)]
            if self._as_root and not _caller_has_sys_admin(req.pid):
                # The store lists trusted.* only to CAP_SYS_ADMIN; the daemon is root.
                names = [n for n in names if not n.startswith(b"trusted.")]
            return names

        return await self.workers.run(work)

    async def removexattr(self, nodeid: int, name: bytes, req: Request) -> None:
        node = self._inode(nodeid)
        node.no_caps_until = node.no_acl_until = 0.0
        await self.workers.run(self._xattr_change, node, name, req,
                               lambda: os.removexattr(node.proc_path, name))

    async def access(self, nodeid: int, mask: int, req: Request) -> None:
        # With default_permissions (always on) the kernel decides access itself from
        # the attributes we report and never asks; answer consistently if it does.
        self._inode(nodeid)
