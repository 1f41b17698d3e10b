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
from typing import Any

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


OPS: dict[str, Any] = {
    f.__name__: f for f in (utimens, futimens, times, lseek, pread, pwrite, fallocate,
                                 copy_range, mmap_append, setxattr, getxattr, listxattr,
                                 removexattr)}


# ------------------------------------------------- more operations (the differential test)
def umask(mask: str) -> int:
    """Set the umask for the operations after this one in a batch."""
    return os.umask(int(mask, 8))


def _flags(spec: str) -> int:
    flags = 0
    for name in spec.split("|"):
        flags |= getattr(os, name)
    return flags


def openf(path: str, flags: str, mode: str = "0", data: str = "") -> str | None:
    """open(2) with ``flags`` ("O_WRONLY|O_TRUNC"), then write ``data`` (if any) at
    offset 0; with O_RDONLY or O_RDWR and no data, the first 16 bytes read, as hex."""
    fd = os.open(path, _flags(flags), int(mode, 8))
    try:
        if data:
            os.pwrite(fd, data.encode(), 0)
            return None
        if _flags(flags) & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR):
            return os.pread(fd, 16, 0).hex()
        return None
    finally:
        os.close(fd)


def mkdir(path: str, mode: str) -> None:
    os.mkdir(path, int(mode, 8))


def mknod(path: str, kind: str, mode: str, major: str = "0", minor: str = "0") -> None:
    kinds = {"fifo": 0o010000, "chr": 0o020000, "blk": 0o060000, "reg": 0o100000}
    os.mknod(path, kinds[kind] | int(mode, 8), os.makedev(int(major), int(minor)))


def symlink(path: str, target: str) -> None:
    os.symlink(target, path)


def link(path: str, source: str) -> None:
    os.link(source, path, follow_symlinks=False)


def unlink(path: str) -> None:
    os.unlink(path)


def rmdir(path: str) -> None:
    os.rmdir(path)


def rename(path: str, target: str) -> None:
    os.rename(path, target)


def chmod(path: str, mode: str) -> None:
    os.chmod(path, int(mode, 8))


def chown(path: str, uid: str, gid: str, follow: str = "1") -> None:
    os.chown(path, int(uid), int(gid), follow_symlinks=follow == "1")


def truncate(path: str, size: str) -> None:
    os.truncate(path, int(size))


def ftruncate(path: str, size: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, int(size))
    finally:
        os.close(fd)


def mmap_write(path: str, offset: str, data: str) -> None:
    """Write ``data`` at ``offset`` through a shared mapping (inside the file's size)."""
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED) as m:
            m[int(offset):int(offset) + len(data)] = data.encode()
            m.flush()
    finally:
        os.close(fd)


_libc.access.argtypes = [ctypes.c_char_p, ctypes.c_int]


def access(path: str, how: str) -> None:
    """access(2) with "F" or any of "RWX"."""
    mode = 0
    for c in how:
        mode |= {"F": os.F_OK, "R": os.R_OK, "W": os.W_OK, "X": os.X_OK}[c]
    _check(_libc.access(path.encode(), mode))


def getxattr_hex(path: str, name: str, follow: str = "0") -> str:
    return os.getxattr(path, name, follow_symlinks=follow == "1").hex()


def setxattr_hex(path: str, name: str, value: str, follow: str = "0") -> None:
    os.setxattr(path, name, bytes.fromhex(value), follow_symlinks=follow == "1")


def _tool(path: str, *args: str) -> list[object]:
    """Run a tool on ``path``: its exit status and output, with the path as PATH."""
    import subprocess
    proc = subprocess.run([*args, path], capture_output=True, text=True, check=False)
    return [proc.returncode, proc.stdout.replace(path, "PATH"),
            proc.stderr.replace(path, "PATH")]


def setfacl(path: str, *args: str) -> list[object]:
    return _tool(path, "setfacl", *args)


def getfacl(path: str, *args: str) -> list[object]:
    return _tool(path, "getfacl", "--omit-header", *args)


OPS.update({f.__name__: f for f in (umask, openf, mkdir, mknod, symlink, link, unlink, rmdir,
                                     rename, chmod, chown, truncate, ftruncate, mmap_write,
                                     access, getxattr_hex, setxattr_hex, setfacl, getfacl)})


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
