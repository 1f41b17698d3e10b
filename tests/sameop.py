"""One file operation, run as whichever user calls it; prints its outcome as JSON.

The semantics tests run the same operation on a store file and on the same file
through the mount, as the same user (``setpriv``), and compare the outcomes. It
needs nothing but the standard library, so that the system's python3 can run it
as an unprivileged user who cannot reach the test venv.

    python3 sameop.py OP PATH [ARG...]

prints ``{"errno": 0 or the errno's name, "value": what the operation returned}``;
``python3 sameop.py --batch`` reads a JSON list of ``[OP, PATH, ARG...]`` on stdin
and prints the list of their outcomes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import sys

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
AT_SYMLINK_NOFOLLOW = 0x100

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec),
                            ctypes.c_int]
_libc.futimens.argtypes = [ctypes.c_int, ctypes.POINTER(_Timespec)]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.lseek.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int]
_libc.lseek.restype = ctypes.c_int64
_libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
_libc.pread.restype = ctypes.c_ssize_t
_libc.pwrite.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
_libc.pwrite.restype = ctypes.c_ssize_t
_libc.copy_file_range.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int,
                                  ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t,
                                  ctypes.c_uint]
_libc.copy_file_range.restype = ctypes.c_ssize_t


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _spec(value: str) -> tuple[int, int]:
    """A timespec from "NOW", "OMIT" or nanoseconds since 1970 (negative before)."""
    if value == "NOW":
        return 0, UTIME_NOW
    if value == "OMIT":
        return 0, UTIME_OMIT
    return divmod(int(value), 1_000_000_000)


def utimens(path: str, atime: str, mtime: str, nofollow: str = "0") -> None:
    """utimensat(2); atime "NULL" passes a NULL times pointer (both now, like touch)."""
    flags = AT_SYMLINK_NOFOLLOW if nofollow == "1" else 0
    if atime == "NULL":
        _check(_libc.utimensat(-100, path.encode(), None, flags))
        return
    times = (_Timespec * 2)()
    times[0].tv_sec, times[0].tv_nsec = _spec(atime)
    times[1].tv_sec, times[1].tv_nsec = _spec(mtime)
    _check(_libc.utimensat(-100, path.encode(), times, flags))


def futimens(path: str, atime: str, mtime: str) -> None:
    """futimens(2) on a descriptor opened for writing (what touch does on a new file)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        times = (_Timespec * 2)()
        times[0].tv_sec, times[0].tv_nsec = _spec(atime)
        times[1].tv_sec, times[1].tv_nsec = _spec(mtime)
        _check(_libc.futimens(fd, times))
    finally:
        os.close(fd)


def times(path: str) -> list[int]:
    st = os.lstat(path)
    return [st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns]


def lseek(path: str, offset: str, whence: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _check(_libc.lseek(fd, int(offset), getattr(os, whence)))
    finally:
        os.close(fd)


def pread(path: str, offset: str, size: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    buf = ctypes.create_string_buffer(int(size) or 1)
    try:
        return _check(_libc.pread(fd, buf, int(size), int(offset)))
    finally:
        os.close(fd)


def pwrite(path: str, offset: str, size: str) -> int:
    fd = os.open(path, os.O_WRONLY)
    buf = ctypes.create_string_buffer(b"w" * int(size), int(size) or 1)
    try:
        return _check(_libc.pwrite(fd, buf, int(size), int(offset)))
    finally:
        os.close(fd)


def fallocate(path: str, mode: str, offset: str, length: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        _check(_libc.fallocate(fd, int(mode), int(offset), int(length)))
    finally:
        os.close(fd)


def copy_range(src: str, dst: str, off_in: str, off_out: str, length: str) -> int:
    fd_in = os.open(src, os.O_RDONLY)
    fd_out = os.open(dst, os.O_WRONLY)
    try:
        pos_in, pos_out = ctypes.c_int64(int(off_in)), ctypes.c_int64(int(off_out))
        return _check(_libc.copy_file_range(fd_in, ctypes.byref(pos_in), fd_out,
                                            ctypes.byref(pos_out), int(length), 0))
    finally:
        os.close(fd_in)
        os.close(fd_out)


def mmap_append(path: str, offset: str, data: str) -> str:
    """Write ``data`` at ``offset`` through a shared mapping of an O_APPEND descriptor,
    then append ``data`` with write(2); the file's bytes after close, as hex."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        with mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED) as m:
            m[int(offset):int(offset) + len(data)] = data.encode()
            m.flush()
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        return f.read().hex()


def setxattr(path: str, name: str, value: str, follow: str = "0") -> None:
    os.setxattr(path, name, value.encode(), follow_symlinks=follow == "1")


def getxattr(path: str, name: str, follow: str = "0") -> str:
    return os.getxattr(path, name, follow_symlinks=follow == "1").decode()


def listxattr(path: str, follow: str = "0") -> list[str]:
    return sorted(n for n in os.listxattr(path, follow_symlinks=follow == "1")
                  if not n.startswith("security.selinux"))


def removexattr(path: str, name: str, follow: str = "0") -> None:
    os.removexattr(path, name, follow_symlinks=follow == "1")


OPS = {f.__name__: f for f in (utimens, futimens, times, lseek, pread, pwrite, fallocate,
                                 copy_range, mmap_append, setxattr, getxattr, listxattr,
                                 removexattr)}


def run(op: str, *args: str) -> dict[str, object]:
    try:
        return {"errno": 0, "value": OPS[op](*args)}
    except OSError as exc:
        return {"errno": errno.errorcode.get(exc.errno or 0, str(exc.errno)), "value": None}


def main() -> None:
    if sys.argv[1:] == ["--batch"]:  # a JSON list of [op, path, arg...] on stdin
        print(json.dumps([run(*item) for item in json.load(sys.stdin)]))
    else:
        print(json.dumps(run(*sys.argv[1:])))


if __name__ == "__main__":
    main()
