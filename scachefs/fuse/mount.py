"""Mount and unmount a FUSE file system: mount(2) as root, fusermount3 otherwise.

As root the daemon opens /dev/fuse and calls mount(2) itself with ``fd=N``, as
libfuse does. A plain user cannot mount; ``fusermount3`` (setuid root) mounts
for it and hands the /dev/fuse descriptor back over a Unix socket named by
``_FUSE_COMMFD`` (libfuse's protocol). Unmounting is lazy (``MNT_DETACH``), so
files still open keep working until they close.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import dataclasses
import os
import select
import shutil
import socket
import subprocess

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MS_NOSYMFOLLOW = 256
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# Generic mount options and the MS_* flag each sets (or, with a "no" twin, clears).
_SET = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
        "sync": MS_SYNCHRONOUS, "dirsync": MS_DIRSYNC, "noatime": MS_NOATIME,
        "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
        "nosymfollow": MS_NOSYMFOLLOW}
_CLEAR = {"rw": MS_RDONLY, "suid": MS_NOSUID, "dev": MS_NODEV, "exec": MS_NOEXEC,
          "async": MS_SYNCHRONOUS, "atime": MS_NOATIME, "diratime": MS_NODIRATIME,
          "norelatime": MS_RELATIME, "nostrictatime": MS_STRICTATIME,
          "symfollow": MS_NOSYMFOLLOW}

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(OSError):
    """The mount could not be made; the message says why."""


@dataclasses.dataclass
class MountSpec:
    """What to mount where, and how."""

    source: str  # shown as the mount's source (fsname)
    mountpoint: str
    subtype: str  # the type shows as fuse.SUBTYPE
    allow_other: bool = False
    flags: tuple[str, ...] = ()  # generic options: ro, noatime, noexec, ...

    def ms_flags(self) -> int:
        flags = MS_NOSUID | MS_NODEV  # what libfuse and fusermount3 do by default
        for name in self.flags:
            if name in _SET:
                flags |= _SET[name]
            elif name in _CLEAR:
                flags &= ~_CLEAR[name]
            else:
                raise ValueError(f"unknown mount flag {name!r}")
        return flags


def mount(spec: MountSpec) -> int:
    """Mount and return the /dev/fuse descriptor of the new connection (close-on-exec)."""
    if os.geteuid() == 0:
        return _mount_as_root(spec)
    return _mount_with_fusermount(spec)


def _mount_as_root(spec: MountSpec) -> int:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(exc.errno, f"cannot open /dev/fuse: {exc.strerror} (is the fuse "
                                    "module loaded?)") from None
    data = (f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},"
            "default_permissions" + (",allow_other" if spec.allow_other else ""))
    ret = _libc.mount(os.fsencode(spec.source), os.fsencode(spec.mountpoint),
                      f"fuse.{spec.subtype}".encode(), spec.ms_flags(), data.encode())
    if ret != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise MountError(err, f"mount(2) of {spec.mountpoint} failed: {os.strerror(err)}")
    return fd


def _escape(value: str) -> str:
    """Escape a value for fusermount3's comma-separated option parser."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def _mount_with_fusermount(spec: MountSpec) -> int:
    fusermount = shutil.which("fusermount3")
    if fusermount is None:
        raise MountError(2, "fusermount3 is not installed (Debian package fuse3); a user "
                            "other than root needs it to mount")
    options = [f"fsname={_escape(spec.source)}", f"subtype={spec.subtype}",
               "default_permissions", *spec.flags]
    if spec.allow_other:
        options.append("allow_other")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen([fusermount, "-o", ",".join(options), "--", spec.mountpoint],
                                env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        theirs.close()
        fds = array.array("i")
        try:
            _, ancdata, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
        except OSError:
            ancdata = []
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        _, err = proc.communicate(timeout=60)
    if proc.returncode != 0 or not fds:
        for fd in fds:
            os.close(fd)
        message = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise MountError(1, f"fusermount3 could not mount {spec.mountpoint}: {message}")
    fd = fds[0]
    os.set_inheritable(fd, False)
    return fd


def connection_alive(fd: int) -> bool:
    """False once the kernel ended the connection (unmounted): /dev/fuse then polls POLLERR."""
    poller = select.poll()
    poller.register(fd, select.POLLERR)
    return not any(event & select.POLLERR for _, event in poller.poll(0))


def unmount(mountpoint: str, fd: int | None = None) -> None:
    """Detach the mount (lazily: open files finish); nothing if ``fd``'s connection is gone."""
    if fd is not None and not connection_alive(fd):
        return
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
            return
        err = ctypes.get_errno()
        if err in (22,):  # EINVAL: not a mount point (any more)
            return
    fusermount = shutil.which("fusermount3")
    if fusermount is not None:
        subprocess.run([fusermount, "-u", "-q", "-z", "--", mountpoint], check=False,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
