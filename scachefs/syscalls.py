"""The few Linux calls the os module lacks: renameat2, fchownat/utimensat with AT_EMPTY_PATH.

They act on O_PATH descriptors directly, so the daemon never resolves a name in
the store for them. All of them block; call them from worker threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                           ctypes.c_int]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec),
                            ctypes.c_int]


def _check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def renameat2(old_dirfd: int, old: bytes, new_dirfd: int, new: bytes, flags: int) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE, relative to directory fds."""
    _check(_libc.renameat2(old_dirfd, old, new_dirfd, new, flags))


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """Change owner of the object behind an O_PATH fd (a symlink itself, not its target).

    -1 leaves that id unchanged.
    """
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def utimens_fd(fd: int, atime_ns: int | None, mtime_ns: int | None, *,
               atime_now: bool = False, mtime_now: bool = False) -> None:
    """Set atime and/or mtime of the object behind an O_PATH fd.

    A time is nanoseconds since 1970 (negative before); None leaves it as is
    (UTIME_OMIT); ``*_now`` sets it to the store's current time (UTIME_NOW), with
    the store's clock and the store's rules.
    """
    times = (_Timespec * 2)()
    for slot, value, now in ((0, atime_ns, atime_now), (1, mtime_ns, mtime_now)):
        if now:
            times[slot].tv_sec, times[slot].tv_nsec = 0, UTIME_NOW
        elif value is None:
            times[slot].tv_sec, times[slot].tv_nsec = 0, UTIME_OMIT
        else:
            times[slot].tv_sec, times[slot].tv_nsec = divmod(value, 1_000_000_000)
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH))


RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # the same number on every Linux architecture


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc.syscall.restype = ctypes.c_long


def open_beneath(root_fd: int, path: bytes, flags: int) -> int:
    """openat2(root_fd, path, RESOLVE_BENEATH): resolve without ever leaving root_fd.

    ``..`` above the root, absolute paths and absolute symlinks fail with EXDEV,
    so a name found in an image header can never reach outside the store.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root_fd), ctypes.c_char_p(path),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode (punch hole, zero range, keep size), which os lacks."""
    _check(_libc.fallocate(fd, mode, offset, length))


MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle),
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]


def file_handle(fd: int) -> bytes:
    """The store's file handle of the object behind ``fd`` (name_to_handle_at), as bytes.

    A handle names the object itself, not a path: it survives renames and the
    daemon's restart (open_by_handle_at), as long as the object exists.
    OSError(EOPNOTSUPP) where the file system has none (many FUSE stores).
    """
    handle = _FileHandle(MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    _check(_libc.name_to_handle_at(fd, b"", ctypes.byref(handle), ctypes.byref(mount_id),
                                   AT_EMPTY_PATH))
    kind = int(handle.handle_type).to_bytes(4, "little", signed=True)
    return kind + bytes(handle.f_handle[:handle.handle_bytes])


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open the object a :func:`file_handle` names (needs CAP_DAC_READ_SEARCH)."""
    if len(handle) < 4 or len(handle) - 4 > MAX_HANDLE_SZ:
        raise OSError(errno.EINVAL, "malformed file handle")
    fh = _FileHandle(len(handle) - 4, int.from_bytes(handle[:4], "little", signed=True))
    ctypes.memmove(fh.f_handle, handle[4:], len(handle) - 4)
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)
