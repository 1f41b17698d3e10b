"""One FUSE connection: read requests from /dev/fuse, dispatch them, write the replies.

The read loop decodes each request in one place (:meth:`Session._dispatch`).
Requests the file system can answer from memory (a READ of resident layer
chunks, FORGET, a cached GETXATTR) are answered right there, without a task or
a thread hop; every other request becomes a trio task running its handler, one
per opcode (``_op_*``), which decodes the arguments, awaits the file system's
handler and encodes the reply. Errors map to errno here and only here: a
handler raising :class:`FuseError` or ``OSError`` answers that errno, any other
exception is a bug, logged and answered EIO; nothing a request does ends the
session. A request the kernel sends malformed is answered EINVAL (or dropped if
it carries no reply) and logged once per opcode.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

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

log = logging.getLogger(__name__)

# Flags the session asks for on every connection; the file system adds its own.
SESSION_FLAGS = (abi.ASYNC_READ | abi.BIG_WRITES | abi.MAX_PAGES | abi.INIT_EXT
                 | abi.PARALLEL_DIROPS | abi.ASYNC_DIO)
MAX_BACKGROUND = 64  # async requests in flight (aio reads of qemu's cache=none)
CONGESTION_THRESHOLD = 48
_CHECKPOINT_EVERY = 32  # inline answers between checkpoints: spawned tasks get to run
_NO_REPLY = frozenset({abi.FORGET, abi.BATCH_FORGET, abi.INTERRUPT})


def _timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def encode_attr(st: os.stat_result, ino: int) -> bytes:
    """struct fuse_attr from a stat result; ``ino`` is what stat(2) will show."""
    return abi.ATTR.pack(
        ino, st.st_size, st.st_blocks,
        st.st_atime_ns // 1_000_000_000, st.st_mtime_ns // 1_000_000_000,
        st.st_ctime_ns // 1_000_000_000,
        st.st_atime_ns % 1_000_000_000, st.st_mtime_ns % 1_000_000_000,
        st.st_ctime_ns % 1_000_000_000,
        st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev & 0xFFFFFFFF,
        st.st_blksize, 0)


def encode_entry(entry: Entry) -> bytes:
    """struct fuse_entry_out."""
    ev, evn = _timeout(entry.entry_timeout)
    av, avn = _timeout(entry.attr_timeout)
    return (abi.ENTRY_OUT_HEAD.pack(entry.nodeid, entry.generation, ev, av, evn, avn)
            + encode_attr(entry.attr, entry.ino or entry.attr.st_ino))


def _cstring(data: bytes, start: int = 0) -> tuple[bytes, int]:
    """A NUL-terminated name at ``start`` and the offset after it; FuseError if malformed."""
    end = data.find(b"\0", start)
    if end < 0:
        raise _Malformed("a name without its NUL")
    return data[start:end], end + 1


def _extension_groups(ext: bytes) -> tuple[int, ...]:
    """The supplementary groups in a request's extensions (FUSE_EXT_GROUPS), if any."""
    pos = 0
    while pos + abi.EXT_HEADER.size <= len(ext):
        size, kind = abi.EXT_HEADER.unpack_from(ext, pos)
        if size < abi.EXT_HEADER.size or pos + size > len(ext):
            break
        if kind == abi.EXT_GROUPS and size >= abi.EXT_HEADER.size + 4:
            (count,) = struct.unpack_from("<I", ext, pos + abi.EXT_HEADER.size)
            start = pos + abi.EXT_HEADER.size + 4
            count = min(count, (pos + size - start) // 4)
            return struct.unpack_from(f"<{count}I", ext, start)
        pos += size
    return ()


class _Malformed(Exception):
    """A request whose arguments do not match its opcode."""


_ENTRY_SIZE = abi.ENTRY_OUT_HEAD.size + abi.ATTR.size
_NO_ENTRY = bytes(_ENTRY_SIZE)  # nodeid 0: an entry without attributes or lookup


class DirBuffer:
    """The reply of one READDIR/READDIRPLUS: entries until the kernel's buffer is full."""

    __slots__ = ("_left", "_parts", "plus")

    def __init__(self, size: int, plus: bool) -> None:
        self.plus = plus
        self._left = size
        self._parts: list[bytes] = []

    def add(self, name: bytes, next_offset: int, ino: int, mode: int,
            entry: Entry | None = None) -> bool:
        """Add an entry; False (nothing added) when it does not fit.

        ``ino`` is the number readdir shows, ``mode`` gives the file type. In a
        READDIRPLUS reply ``entry`` counts as a lookup the kernel will forget;
        without one the entry carries no attributes (nodeid 0), which the kernel
        treats like a plain READDIR entry.
        """
        namelen = len(name)
        size = abi.DIRENT_HEAD.size + namelen
        pad = -size % 8
        size += pad
        if self.plus:
            size += _ENTRY_SIZE
        if size > self._left:
            return False
        if self.plus:
            self._parts.append(_NO_ENTRY if entry is None else encode_entry(entry))
        self._parts += (abi.DIRENT_HEAD.pack(ino, next_offset, namelen,
                                             stat.S_IFMT(mode) >> 12), name, b"\0" * pad)
        self._left -= size
        return True

    def payload(self) -> bytes:
        return b"".join(self._parts)


class Session:
    """A FUSE session on an open /dev/fuse descriptor, serving one :class:`Operations`."""

    def __init__(self, fd: int, ops: Operations, *, max_tasks: int = 1024) -> None:
        self.fd = fd
        os.set_blocking(fd, False)  # the loop waits in trio, never in read(2)
        self.ops = ops
        self.max_tasks = max_tasks
        self.proto_minor = 0
        self.flags = 0  # INIT flags in effect (flags | flags2 << 32)
        self.passthrough = False  # FUSE_PASSTHROUGH negotiated
        self.counts: Counter[str] = Counter()  # requests per opcode name, for the stats
        self._nursery: trio.Nursery | None = None
        self._inflight = 0
        self._slot_free = trio.Event()
        self._malformed_logged: set[int] = set()
        # Called with (protocol minor, flags) once INIT is negotiated, before its reply.
        self.on_init: Callable[[int, int], None] = lambda minor, flags: None
        self._reading = trio.CancelScope()
        self._handing_over = False
        self._waits: dict[int, trio.CancelScope] = {}  # SETLKW in progress, by unique
        # --debug: every request and its answer in the log. Decided once, here: when
        # off, the read loop and the replies run the plain methods, with no check.
        self._pending: dict[int, tuple[str, float]] = {}
        self._dispatch_one: Callable[[bytearray, int], None] = self._dispatch
        self._write: Callable[[Sequence[bytes | memoryview]], None] = self._write_reply
        self.log_requests(log.isEnabledFor(logging.DEBUG))

    def log_requests(self, on: bool) -> None:
        """Log every request and its answer at DEBUG (--debug, the log_level action)."""
        self._dispatch_one = self._dispatch_logged if on else self._dispatch
        self._write = self._write_logged if on else self._write_reply
        if not on:
            self._pending.clear()
        self._handlers: dict[int, Callable[[Request, int, bytes], Awaitable[None]]] = {
            abi.LOOKUP: self._op_lookup, abi.GETATTR: self._op_getattr,
            abi.SETATTR: self._op_setattr, abi.READLINK: self._op_readlink,
            abi.SYMLINK: self._op_symlink, abi.MKNOD: self._op_mknod,
            abi.MKDIR: self._op_mkdir, abi.UNLINK: self._op_unlink, abi.RMDIR: self._op_rmdir,
            abi.RENAME: self._op_rename, abi.RENAME2: self._op_rename2, abi.LINK: self._op_link,
            abi.OPEN: self._op_open, abi.READ: self._op_read, abi.WRITE: self._op_write,
            abi.STATFS: self._op_statfs, abi.RELEASE: self._op_release,
            abi.FSYNC: self._op_fsync, abi.SETXATTR: self._op_setxattr,
            abi.GETXATTR: self._op_getxattr, abi.LISTXATTR: self._op_listxattr,
            abi.REMOVEXATTR: self._op_removexattr, abi.FLUSH: self._op_flush,
            abi.OPENDIR: self._op_opendir, abi.READDIR: self._op_readdir,
            abi.READDIRPLUS: self._op_readdirplus, abi.RELEASEDIR: self._op_releasedir,
            abi.FSYNCDIR: self._op_fsyncdir, abi.ACCESS: self._op_access,
            abi.CREATE: self._op_create, abi.FALLOCATE: self._op_fallocate,
            abi.LSEEK: self._op_lseek, abi.COPY_FILE_RANGE: self._op_copy_file_range,
            abi.GETLK: self._op_getlk, abi.SETLK: self._op_setlk, abi.SETLKW: self._op_setlkw,
        }

    # ------------------------------------------------------------------ loop
    async def serve(self, resume: tuple[int, int] | None = None) -> None:
        """Negotiate INIT, then serve until the file system is unmounted.

        ``resume`` = (protocol minor, flags) takes over a connection another process
        initialized: the kernel sends no second INIT, and the requests that process
        read but never answered are requeued (FUSE_NOTIFY_RESEND) and served here.
        """
        if resume is None:
            await self._init()
        else:
            self._resume(*resume)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            with self._reading:
                await self._loop()
            if not self._handing_over:
                nursery.cancel_scope.cancel()  # unmounted: nobody waits for these replies
            # Handing over: the requests in hand finish and answer; then we are done.
        self._nursery = None

    def handover(self) -> None:
        """Stop reading requests; :meth:`serve` returns once those in hand are answered."""
        self._handing_over = True
        self._reading.cancel()

    def _resume(self, minor: int, flags: int) -> None:
        self.proto_minor, self.flags = minor, flags
        self.passthrough = bool(flags & abi.PASSTHROUGH)
        self.ops.init(flags)
        if flags & abi.HAS_RESEND:
            self._notify(abi.NOTIFY_RESEND, b"")
            log.info("took over the FUSE connection (7.%d); requests in flight were resent",
                     minor)
        else:
            log.warning("took over the FUSE connection, but the kernel cannot resend the "
                        "requests the previous daemon held (Linux 6.9+): they wait forever")

    async def _read(self, buf: bytearray) -> int | None:
        """One request into ``buf``; None once the connection is gone."""
        while True:
            try:
                return os.readv(self.fd, [buf])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # interrupted before we read it
                    continue
                if exc.errno in (errno.ENODEV, errno.ECONNABORTED):
                    return None  # unmounted, or aborted through /sys/fs/fuse/connections
                raise

    async def _init(self) -> None:
        buf = bytearray(abi.READ_BUFFER)
        while True:
            n = await self._read(buf)
            if n is None:
                raise ConnectionError("the FUSE connection ended before INIT")
            _, opcode, unique, *_ = abi.IN_HEADER.unpack_from(buf)
            if opcode == abi.INIT:
                break
            log.warning("request %s before INIT: answered EIO",
                        abi.OPCODE_NAMES.get(opcode, opcode))
            self._reply_error(unique, errno.EIO)
        major, minor, max_readahead, flags, flags2 = abi.INIT_IN.unpack_from(
            buf + bytes(64), abi.IN_HEADER.size)
        if major != abi.KERNEL_VERSION or minor < abi.KERNEL_MINOR_MIN:
            self._reply_error(unique, errno.EPROTO)
            raise ConnectionError(f"the kernel speaks FUSE {major}.{minor}; scachefs needs "
                                  f"7.{abi.KERNEL_MINOR_MIN} or newer (Linux 5.10+)")
        capable = flags | ((flags2 << 32) if flags & abi.INIT_EXT else 0)
        try:
            wanted = self.ops.init(capable)
        except ConnectionError:
            self._reply_error(unique, errno.EPROTO)
            raise
        # HAS_RESEND is the kernel's to announce; kept in our flags, so that a daemon
        # taking over later knows it may ask for a resend.
        want = (SESSION_FLAGS | wanted | abi.HAS_RESEND) & capable
        if minor < abi.PASSTHROUGH_MINOR:
            want &= ~abi.PASSTHROUGH
        self.proto_minor = min(minor, abi.OUR_MINOR)
        self.flags = want
        self.passthrough = bool(want & abi.PASSTHROUGH)
        reply = abi.INIT_OUT.pack(
            abi.KERNEL_VERSION, self.proto_minor, max_readahead, want & 0xFFFFFFFF,
            MAX_BACKGROUND, CONGESTION_THRESHOLD, abi.MAX_WRITE, 1, abi.MAX_PAGES_LIMIT, 0,
            want >> 32, 1 if self.passthrough else 0, 0)
        self.on_init(self.proto_minor, want)
        self._reply(unique, reply)
        log.debug("FUSE 7.%d negotiated, flags %#x (kernel offered %#x)", self.proto_minor,
                  want, capable)

    async def _loop(self) -> None:
        buf = bytearray(abi.READ_BUFFER)
        since_checkpoint = 0
        while True:
            if self._inflight >= self.max_tasks:
                self._slot_free = trio.Event()
                await self._slot_free.wait()
            n = await self._read(buf)
            if n is None:
                return
            try:
                self._dispatch_one(buf, n)
            except Exception:  # a bug in the loop itself: log, keep serving
                log.exception("internal error dispatching a request")
            since_checkpoint += 1
            if since_checkpoint >= _CHECKPOINT_EVERY:
                since_checkpoint = 0
                await trio.lowlevel.checkpoint()

    def _dispatch(self, buf: bytearray, n: int) -> None:
        if n < abi.IN_HEADER.size:
            log.warning("short FUSE request of %d bytes ignored", n)
            return
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = \
            abi.IN_HEADER.unpack_from(buf)
        name = abi.OPCODE_NAMES.get(opcode, str(opcode))
        self.counts[name] += 1
        if length != n or extlen * 8 > n - abi.IN_HEADER.size:
            self._malformed(opcode, unique, f"length {length} for {n} bytes read")
            return
        if opcode == abi.READ and n >= abi.IN_HEADER.size + abi.READ_IN.size:
            fh, offset, size = abi.READ_IN.unpack_from(buf, abi.IN_HEADER.size)[:3]
            pieces = self.ops.read_now(fh, offset, size)
            if pieces is not None:
                length = abi.OUT_HEADER.size + sum(len(p) for p in pieces)
                self._write([abi.OUT_HEADER.pack(length, 0, unique), *pieces])
                return
        elif opcode == abi.FORGET:
            if n >= abi.IN_HEADER.size + abi.FORGET_IN.size:
                (count,) = abi.FORGET_IN.unpack_from(buf, abi.IN_HEADER.size)
                self.ops.forget([(nodeid, count)])
            return
        elif opcode == abi.BATCH_FORGET:
            self._batch_forget(buf, n)
            return
        elif opcode == abi.INTERRUPT:
            # Handlers always finish (the kernel waits for their answers), but a lock
            # wait is given up: it answers EINTR.
            if n >= abi.IN_HEADER.size + abi.INTERRUPT_IN.size:
                (target,) = abi.INTERRUPT_IN.unpack_from(buf, abi.IN_HEADER.size)
                scope = self._waits.get(target)
                if scope is not None:
                    scope.cancel()
            return
        elif opcode == abi.DESTROY:
            self.ops.destroy()
            self._reply(unique, b"")
            return
        handler = self._handlers.get(opcode)
        if handler is None:
            self._reply_error(unique, errno.ENOSYS)
            return
        args = bytes(buf[abi.IN_HEADER.size:n - extlen * 8])  # the buffer is reused
        if opcode == abi.GETXATTR and len(args) > abi.GETXATTR_IN.size:
            end = args.find(b"\0", abi.GETXATTR_IN.size)
            quick = (self.ops.getxattr_now(nodeid, args[abi.GETXATTR_IN.size:end])
                     if end >= 0 else None)
            if quick is not None:
                (size, _) = abi.GETXATTR_IN.unpack_from(args)
                self._reply_xattr(unique, quick, size)
                return
        req = Request(uid, gid, pid, unique)
        if extlen:
            req.groups = _extension_groups(bytes(buf[n - extlen * 8:n]))
        assert self._nursery is not None
        self._inflight += 1
        self._nursery.start_soon(self._run, handler, req, nodeid, args, name=name)

    def _dispatch_logged(self, buf: bytearray, n: int) -> None:
        """_dispatch, and the request in the log (--debug); its answer follows at the reply."""
        if n >= abi.IN_HEADER.size:
            _, opcode, unique, nodeid, uid, gid, pid, _, _ = abi.IN_HEADER.unpack_from(buf)
            what = (f"{abi.OPCODE_NAMES.get(opcode, str(opcode))} unique={unique} "
                    f"nodeid={nodeid} uid={uid} gid={gid} pid={pid}")
            if opcode in _NO_REPLY:
                log.debug("%s: no reply", what)
            else:
                self._pending[unique] = (what, time.monotonic())
        self._dispatch(buf, n)

    def _batch_forget(self, buf: bytearray, n: int) -> None:
        start = abi.IN_HEADER.size
        if n < start + abi.BATCH_FORGET_IN.size:
            return
        (count, _) = abi.BATCH_FORGET_IN.unpack_from(buf, start)
        start += abi.BATCH_FORGET_IN.size
        count = min(count, (n - start) // abi.FORGET_ONE.size)
        items = [abi.FORGET_ONE.unpack_from(buf, start + i * abi.FORGET_ONE.size)
                 for i in range(count)]
        self.ops.forget(items)

    async def _run(self, handler: Callable[[Request, int, bytes], Awaitable[None]],
                   req: Request, nodeid: int, args: bytes) -> None:
        try:
            await handler(req, nodeid, args)
        except FuseError as exc:
            self._reply_error(req.unique, exc.errno)
        except _Malformed as exc:
            self._malformed(-1, req.unique, str(exc))
        except OSError as exc:
            self.ops.failed(getattr(handler, "__name__", "?").removeprefix("_op_"), exc)
            self._reply_error(req.unique, exc.errno or errno.EIO)
        except Exception:
            log.exception("internal error in %s", getattr(handler, "__name__", handler))
            self._reply_error(req.unique, errno.EIO)
        finally:
            self._inflight -= 1
            if self._inflight < self.max_tasks:
                self._slot_free.set()

    # --------------------------------------------------------------- replies
    def _write_logged(self, parts: Sequence[bytes | memoryview]) -> None:
        """_write_reply, and the answer in the log with its request (--debug)."""
        length, error, unique = abi.OUT_HEADER.unpack_from(parts[0])
        what, started = self._pending.pop(unique, (f"unique={unique}", 0.0))
        answer = (f"{errno.errorcode.get(-error, str(-error))}" if error
                  else f"OK, {length - abi.OUT_HEADER.size} bytes")
        log.debug("%s -> %s (%.3f ms)", what, answer,
                  (time.monotonic() - started) * 1e3 if started else 0.0)
        self._write_reply(parts)

    def _write_reply(self, parts: Sequence[bytes | memoryview]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            # ENOENT: the request was interrupted and the kernel no longer waits;
            # ENODEV: unmounted meanwhile. Nothing is lost either way.
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("cannot write a FUSE reply: %s", exc)

    def _reply(self, unique: int, payload: bytes | memoryview) -> None:
        self._write([abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), 0, unique),
                     payload])

    def _reply_error(self, unique: int, err: int) -> None:
        self._write([abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -err, unique)])

    def _reply_xattr(self, unique: int, value: bytes | int, size: int) -> None:
        if isinstance(value, int):
            self._reply_error(unique, value)
        elif size == 0:
            self._reply(unique, abi.GETXATTR_OUT.pack(len(value), 0))
        elif len(value) > size:
            self._reply_error(unique, errno.ERANGE)
        else:
            self._reply(unique, value)

    def _malformed(self, opcode: int, unique: int, what: str) -> None:
        if opcode not in self._malformed_logged:
            self._malformed_logged.add(opcode)
            log.warning("malformed FUSE request %s (%s): answered EINVAL",
                        abi.OPCODE_NAMES.get(opcode, opcode), what)
        self._reply_error(unique, errno.EINVAL)

    def _reply_entry(self, unique: int, entry: Entry) -> None:
        self._reply(unique, encode_entry(entry))

    def _reply_attr(self, unique: int, attr: Attr) -> None:
        sec, nsec = _timeout(attr.timeout)
        self._reply(unique, abi.ATTR_OUT_HEAD.pack(sec, nsec, 0)
                    + encode_attr(attr.attr, attr.ino or attr.attr.st_ino))

    def _reply_open(self, unique: int, opened: Opened) -> None:
        self._reply(unique, self._open_out(opened))

    def _open_out(self, opened: Opened) -> bytes:
        flags = 0
        if opened.backing_id:
            flags |= abi.FOPEN_PASSTHROUGH
        else:
            if opened.keep_cache:
                flags |= abi.FOPEN_KEEP_CACHE
            if opened.direct_io:
                flags |= abi.FOPEN_DIRECT_IO
        if opened.noflush:
            flags |= abi.FOPEN_NOFLUSH
        return abi.OPEN_OUT.pack(opened.fh, flags, opened.backing_id)

    # ------------------------------------------------------------ passthrough
    def backing_open(self, fd: int) -> int:
        """Register ``fd``'s file as a backing file of this connection; its id (blocking-free)."""
        arg = bytearray(abi.BACKING_MAP.pack(fd, 0, 0))
        backing_id = fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_OPEN, arg, True)
        return int(backing_id)

    def backing_close(self, backing_id: int) -> None:
        arg = bytearray(backing_id.to_bytes(4, "little"))
        fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_CLOSE, arg, True)

    # ---------------------------------------------------------- notifications
    def notify_inval_inode(self, nodeid: int, offset: int = 0, length: int = 0) -> None:
        """Drop the kernel's cached attributes and pages of a node (blocking: a worker)."""
        payload = abi.NOTIFY_INVAL_INODE_OUT.pack(nodeid, offset, length)
        self._notify(abi.NOTIFY_INVAL_INODE, payload)

    def notify_inval_entry(self, parent: int, name: bytes) -> None:
        """Drop the kernel's cached name ``name`` in ``parent`` (blocking: a worker)."""
        payload = abi.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
        self._notify(abi.NOTIFY_INVAL_ENTRY, payload)

    def _notify(self, code: int, payload: bytes) -> None:
        header = abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), code, 0)
        try:
            os.writev(self.fd, [header, payload])
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):  # ENOENT: not cached
                raise

    # ------------------------------------------------------- opcode handlers
    async def _op_lookup(self, req: Request, nodeid: int, args: bytes) -> None:
        name, _ = _cstring(args)
        self._reply_entry(req.unique, await self.ops.lookup(nodeid, name, req))

    async def _op_getattr(self, req: Request, nodeid: int, args: bytes) -> None:
        fh = None
        if len(args) >= abi.GETATTR_IN.size:
            flags, _, fh_value = abi.GETATTR_IN.unpack_from(args)
            if flags & abi.GETATTR_FH:
                fh = fh_value
        self._reply_attr(req.unique, await self.ops.getattr(nodeid, fh, req))

    async def _op_setattr(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.SETATTR_IN.size:
            raise _Malformed("short setattr_in")
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid,
         _) = abi.SETATTR_IN.unpack_from(args)
        changes = SetAttr(
            mode=mode if valid & abi.FATTR_MODE else None,
            uid=uid if valid & abi.FATTR_UID else None,
            gid=gid if valid & abi.FATTR_GID else None,
            size=size if valid & abi.FATTR_SIZE else None,
            fh=fh if valid & abi.FATTR_FH else None,
            kill_suidgid=bool(valid & abi.FATTR_KILL_SUIDGID))
        # *_NOW: the caller asked for the current time (UTIME_NOW); the time fields
        # then carry nothing, and the store sets its own clock's time.
        if valid & abi.FATTR_ATIME_NOW:
            changes.atime_now = True
        elif valid & abi.FATTR_ATIME:
            changes.atime_ns = atime * 1_000_000_000 + atimensec
        if valid & abi.FATTR_MTIME_NOW:
            changes.mtime_now = True
        elif valid & abi.FATTR_MTIME:
            changes.mtime_ns = mtime * 1_000_000_000 + mtimensec
        self._reply_attr(req.unique, await self.ops.setattr(nodeid, changes, req))

    async def _op_readlink(self, req: Request, nodeid: int, args: bytes) -> None:
        self._reply(req.unique, await self.ops.readlink(nodeid, req))

    async def _op_symlink(self, req: Request, nodeid: int, args: bytes) -> None:
        name, rest = _cstring(args)
        target, _ = _cstring(args, rest)
        self._reply_entry(req.unique, await self.ops.symlink(nodeid, name, target, req))

    async def _op_mknod(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.MKNOD_IN.size:
            raise _Malformed("short mknod_in")
        mode, rdev, umask, _ = abi.MKNOD_IN.unpack_from(args)
        name, _ = _cstring(args, abi.MKNOD_IN.size)
        req.umask = umask
        self._reply_entry(req.unique, await self.ops.mknod(nodeid, name, mode, rdev, req))

    async def _op_mkdir(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.MKDIR_IN.size:
            raise _Malformed("short mkdir_in")
        mode, umask = abi.MKDIR_IN.unpack_from(args)
        name, _ = _cstring(args, abi.MKDIR_IN.size)
        req.umask = umask
        self._reply_entry(req.unique, await self.ops.mkdir(nodeid, name, mode, req))

    async def _op_unlink(self, req: Request, nodeid: int, args: bytes) -> None:
        name, _ = _cstring(args)
        await self.ops.unlink(nodeid, name, req)
        self._reply(req.unique, b"")

    async def _op_rmdir(self, req: Request, nodeid: int, args: bytes) -> None:
        name, _ = _cstring(args)
        await self.ops.rmdir(nodeid, name, req)
        self._reply(req.unique, b"")

    async def _rename(self, req: Request, nodeid: int, args: bytes, head: int,
                      new_parent: int, flags: int) -> None:
        old, rest = _cstring(args, head)
        new, _ = _cstring(args, rest)
        await self.ops.rename(nodeid, old, new_parent, new, flags, req)
        self._reply(req.unique, b"")

    async def _op_rename(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.RENAME_IN.size:
            raise _Malformed("short rename_in")
        (new_parent,) = abi.RENAME_IN.unpack_from(args)
        await self._rename(req, nodeid, args, abi.RENAME_IN.size, new_parent, 0)

    async def _op_rename2(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.RENAME2_IN.size:
            raise _Malformed("short rename2_in")
        new_parent, flags, _ = abi.RENAME2_IN.unpack_from(args)
        await self._rename(req, nodeid, args, abi.RENAME2_IN.size, new_parent, flags)

    async def _op_link(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.LINK_IN.size:
            raise _Malformed("short link_in")
        (old_node,) = abi.LINK_IN.unpack_from(args)
        name, _ = _cstring(args, abi.LINK_IN.size)
        self._reply_entry(req.unique, await self.ops.link(old_node, nodeid, name, req))

    async def _op_open(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.OPEN_IN.size:
            raise _Malformed("short open_in")
        flags, open_flags = abi.OPEN_IN.unpack_from(args)
        if open_flags & abi.OPEN_KILL_SUIDGID:
            await self.ops.setattr(nodeid, SetAttr(kill_suidgid=True), req)
        self._reply_open(req.unique, await self.ops.open(nodeid, flags, req))

    async def _op_create(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.CREATE_IN.size:
            raise _Malformed("short create_in")
        flags, mode, umask, _ = abi.CREATE_IN.unpack_from(args)
        name, _ = _cstring(args, abi.CREATE_IN.size)
        req.umask = umask
        entry, opened = await self.ops.create(nodeid, name, mode, flags, req)
        self._reply(req.unique, encode_entry(entry) + self._open_out(opened))

    async def _op_read(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.READ_IN.size:
            raise _Malformed("short read_in")
        fh, offset, size = abi.READ_IN.unpack_from(args)[:3]
        self._reply(req.unique, await self.ops.read(fh, offset, size))

    async def _op_write(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.WRITE_IN.size:
            raise _Malformed("short write_in")
        fh, offset, size, write_flags = abi.WRITE_IN.unpack_from(args)[:4]
        data = args[abi.WRITE_IN.size:abi.WRITE_IN.size + size]
        if len(data) != size:
            raise _Malformed(f"write of {size} bytes carries {len(data)}")
        written = await self.ops.write(fh, offset, data,
                                       bool(write_flags & abi.WRITE_KILL_SUIDGID))
        self._reply(req.unique, abi.WRITE_OUT.pack(written, 0))

    async def _op_statfs(self, req: Request, nodeid: int, args: bytes) -> None:
        sv = await self.ops.statfs(nodeid, req)
        self._reply(req.unique, abi.KSTATFS.pack(sv.f_blocks, sv.f_bfree, sv.f_bavail,
                                                 sv.f_files, sv.f_ffree, sv.f_bsize,
                                                 sv.f_namemax, sv.f_frsize))

    async def _op_release(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.RELEASE_IN.size:
            raise _Malformed("short release_in")
        (fh,) = abi.RELEASE_IN.unpack_from(args)[:1]
        await self.ops.release(fh)
        self._reply(req.unique, b"")

    async def _op_fsync(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.FSYNC_IN.size:
            raise _Malformed("short fsync_in")
        fh, flags, _ = abi.FSYNC_IN.unpack_from(args)
        await self.ops.fsync(fh, bool(flags & abi.FSYNC_FDATASYNC))
        self._reply(req.unique, b"")

    async def _op_flush(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.FLUSH_IN.size:
            raise _Malformed("short flush_in")
        fh, _, _, lock_owner = abi.FLUSH_IN.unpack_from(args)
        await self.ops.flush(fh, lock_owner)
        self._reply(req.unique, b"")

    def _lk_in(self, args: bytes) -> tuple[int, int, Lock]:
        if len(args) < abi.LK_IN.size:
            raise _Malformed("short lk_in")
        fh, owner, start, end, ltype, pid, lk_flags, _ = abi.LK_IN.unpack_from(args)
        if start > end or end > (1 << 63) - 1:
            raise FuseError(errno.EINVAL)
        return fh, owner, Lock(ltype, start, end, pid, bool(lk_flags & abi.LK_FLOCK))

    async def _op_getlk(self, req: Request, nodeid: int, args: bytes) -> None:
        fh, owner, lock = self._lk_in(args)
        found = await self.ops.getlk(fh, owner, lock)
        self._reply(req.unique, abi.LK_OUT.pack(found.start, found.end, found.type,
                                                max(found.pid, 0)))

    async def _op_setlk(self, req: Request, nodeid: int, args: bytes) -> None:
        fh, owner, lock = self._lk_in(args)
        await self.ops.setlk(fh, owner, lock, wait=False)
        self._reply(req.unique, b"")

    async def _op_setlkw(self, req: Request, nodeid: int, args: bytes) -> None:
        fh, owner, lock = self._lk_in(args)
        with trio.CancelScope() as scope:
            self._waits[req.unique] = scope
            try:
                await self.ops.setlk(fh, owner, lock, wait=True)
            finally:
                del self._waits[req.unique]
        if scope.cancelled_caught:
            raise FuseError(errno.EINTR)
        self._reply(req.unique, b"")

    async def _op_setxattr(self, req: Request, nodeid: int, args: bytes) -> None:
        if self.flags & abi.SETXATTR_EXT:
            head = abi.SETXATTR_IN_EXT.size
            if len(args) < head:
                raise _Malformed("short setxattr_in")
            size, flags, setxattr_flags, _ = abi.SETXATTR_IN_EXT.unpack_from(args)
            req.acl_kill_sgid = bool(setxattr_flags & abi.SETXATTR_ACL_KILL_SGID)
        else:
            head = abi.SETXATTR_IN.size
            if len(args) < head:
                raise _Malformed("short setxattr_in")
            size, flags = abi.SETXATTR_IN.unpack_from(args)
        name, rest = _cstring(args, head)
        value = args[rest:rest + size]
        if len(value) != size:
            raise _Malformed("setxattr value shorter than its size")
        await self.ops.setxattr(nodeid, name, value, flags, req)
        self._reply(req.unique, b"")

    async def _op_getxattr(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.GETXATTR_IN.size:
            raise _Malformed("short getxattr_in")
        (size, _) = abi.GETXATTR_IN.unpack_from(args)
        name, _ = _cstring(args, abi.GETXATTR_IN.size)
        self._reply_xattr(req.unique, await self.ops.getxattr(nodeid, name, req), size)

    async def _op_listxattr(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.GETXATTR_IN.size:
            raise _Malformed("short getxattr_in")
        (size, _) = abi.GETXATTR_IN.unpack_from(args)
        names = await self.ops.listxattr(nodeid, req)
        self._reply_xattr(req.unique, b"".join(n + b"\0" for n in names), size)

    async def _op_removexattr(self, req: Request, nodeid: int, args: bytes) -> None:
        name, _ = _cstring(args)
        await self.ops.removexattr(nodeid, name, req)
        self._reply(req.unique, b"")

    async def _op_opendir(self, req: Request, nodeid: int, args: bytes) -> None:
        fh = await self.ops.opendir(nodeid, req)
        self._reply_open(req.unique, Opened(fh))

    async def _readdir(self, req: Request, args: bytes, plus: bool) -> None:
        if len(args) < abi.READ_IN.size:
            raise _Malformed("short read_in")
        fh, offset, size = abi.READ_IN.unpack_from(args)[:3]
        out = DirBuffer(size, plus)
        await self.ops.readdir(fh, offset, out)
        self._reply(req.unique, out.payload())

    async def _op_readdir(self, req: Request, nodeid: int, args: bytes) -> None:
        await self._readdir(req, args, plus=False)

    async def _op_readdirplus(self, req: Request, nodeid: int, args: bytes) -> None:
        await self._readdir(req, args, plus=True)

    async def _op_releasedir(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.RELEASE_IN.size:
            raise _Malformed("short release_in")
        (fh,) = abi.RELEASE_IN.unpack_from(args)[:1]
        await self.ops.releasedir(fh)
        self._reply(req.unique, b"")

    async def _op_fsyncdir(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.FSYNC_IN.size:
            raise _Malformed("short fsync_in")
        fh, flags, _ = abi.FSYNC_IN.unpack_from(args)
        await self.ops.fsyncdir(fh, bool(flags & abi.FSYNC_FDATASYNC))
        self._reply(req.unique, b"")

    async def _op_access(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.ACCESS_IN.size:
            raise _Malformed("short access_in")
        (mask, _) = abi.ACCESS_IN.unpack_from(args)
        await self.ops.access(nodeid, mask, req)
        self._reply(req.unique, b"")

    async def _op_fallocate(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.FALLOCATE_IN.size:
            raise _Malformed("short fallocate_in")
        fh, offset, length, mode, _ = abi.FALLOCATE_IN.unpack_from(args)
        await self.ops.fallocate(fh, offset, length, mode, req)
        self._reply(req.unique, b"")

    async def _op_lseek(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.LSEEK_IN.size:
            raise _Malformed("short lseek_in")
        fh, offset, whence, _ = abi.LSEEK_IN.unpack_from(args)
        result = await self.ops.lseek(fh, offset, whence)
        self._reply(req.unique, abi.LSEEK_OUT.pack(result))

    async def _op_copy_file_range(self, req: Request, nodeid: int, args: bytes) -> None:
        if len(args) < abi.COPY_FILE_RANGE_IN.size:
            raise _Malformed("short copy_file_range_in")
        fh_in, off_in, _, fh_out, off_out, length, flags = \
            abi.COPY_FILE_RANGE_IN.unpack_from(args)
        copied = await self.ops.copy_file_range(fh_in, off_in, fh_out, off_out, length,
                                                flags, req)
        self._reply(req.unique, abi.WRITE_OUT.pack(copied, 0))

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        return {"protocol": f"7.{self.proto_minor}", "passthrough": self.passthrough,
                "requests": dict(sorted(self.counts.items())), "inflight": self._inflight}
