"""Acting as the caller: per-thread fsuid/fsgid, supplementary groups and capabilities.

The daemon runs as root. Where the store itself must decide (who owns a new
file, whether it keeps setgid, whether a write drops setuid, whether a name that
appeared since the kernel's lookup may be opened), a worker thread takes on the
caller's credentials for that one call, as virtiofsd does:

- ``setfsgid``/``setfsuid`` (per-thread system calls) make the store check and
  record the caller's ids; an fsuid other than 0 also drops CAP_CHOWN,
  CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_MKNOD & co. from the thread;
- the raw ``setgroups`` system call sets the thread's supplementary groups
  (glibc's ``setgroups``, and so ``os.setgroups``, changes every thread);
- ``capset`` clears the rest of the thread's effective capabilities
  (CAP_SYS_RESOURCE would let a user's write use the blocks ext4 reserves for
  root, for one), keeping them permitted so that they can come back.

Everything is undone in ``finally``. A thread that cannot get its own
credentials back must not serve another request: the process logs it and
aborts (a holder, if any, starts a successor).

Only a daemon running as root switches; a daemon run by a user (fusermount3)
serves that user alone and acts as itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import logging
import os
import platform
import sys
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.argtypes = [ctypes.c_uint]

# setgroups(2) per thread needs the raw system call; its number differs per architecture.
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159, "riscv64": 159, "ppc64le": 81,
                  "s390x": 206}.get(platform.machine())
CLONE_FS = 0x200
_CAP_VERSION_3 = 0x20080522
CAP_FSETID = 4


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CapArray = _CapData * 2  # 64 capability bits in two words
_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
# (effective, permitted, inheritable), each as a 64-bit mask
Caps = tuple[int, int, int]


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _capget() -> Caps:
    """This thread's capability sets."""
    data = _CapArray()
    if _libc.capget(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), data) != 0:
        raise _fail("capget")
    return (data[0].effective | data[1].effective << 32,
            data[0].permitted | data[1].permitted << 32,
            data[0].inheritable | data[1].inheritable << 32)


def _set_effective(saved: Caps, effective: int) -> None:
    """Set this thread's effective capabilities (within the permitted ones of ``saved``)."""
    data = _CapArray()
    for i in (0, 1):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (saved[1] >> shift) & 0xFFFFFFFF
        data[i].inheritable = (saved[2] >> shift) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), data) != 0:
        raise _fail("capset")


def _setgroups(groups: tuple[int, ...]) -> None:
    if _SYS_SETGROUPS is None:
        raise OSError(0, f"setgroups per thread is not known on {platform.machine()}")
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _libc.syscall(ctypes.c_long(_SYS_SETGROUPS), ctypes.c_size_t(len(groups)), array) != 0:
        raise _fail("setgroups")


def _setfsuid(uid: int) -> None:
    _libc.setfsuid(uid)
    if _libc.setfsuid(0xFFFFFFFF) != uid:  # -1 changes nothing and returns the current one
        raise OSError(0, f"setfsuid({uid}) did not take")


def _setfsgid(gid: int) -> None:
    _libc.setfsgid(gid)
    if _libc.setfsgid(0xFFFFFFFF) != gid:
        raise OSError(0, f"setfsgid({gid}) did not take")


def _die(what: str, exc: BaseException) -> None:
    """A worker thread is stuck with someone else's credentials: never serve again."""
    message = f"cannot restore the daemon's credentials after {what}: {exc}; aborting"
    log.critical(message)
    print(f"scachefs: {message}", file=sys.stderr, flush=True)
    os.abort()


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Whom a store call is made for: fsuid, fsgid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


_local = threading.local()
_daemon_groups: tuple[int, ...] = tuple(os.getgroups())


def _own_fs_struct() -> None:
    """Give this thread its own umask (and cwd): unshare(CLONE_FS), once per thread."""
    if getattr(_local, "own_fs", False):
        return
    if _libc.unshare(CLONE_FS) != 0:
        raise _fail("unshare(CLONE_FS)")
    _local.own_fs = True


def enabled() -> bool:
    """Whether this process can act as its callers (it runs as root)."""
    return os.geteuid() == 0


@contextlib.contextmanager
def acting_as(caller: Caller | None, umask: int | None = None) -> Iterator[None]:
    """Within the block this thread acts with ``caller``'s credentials (and ``umask``).

    ``caller`` None, or a root caller with root's group and no groups: the daemon's own
    credentials (root keeps its capabilities, as on the store). Worker threads only.
    """
    old_umask = None
    if umask is not None:
        _own_fs_struct()
        old_umask = os.umask(umask & 0o7777)
    try:
        if caller is None or not enabled() or (caller.uid == 0 and caller.gid == 0
                                               and not caller.groups):
            yield
            return
        with _switched(caller):
            yield
    finally:
        if old_umask is not None:
            os.umask(old_umask)


@contextlib.contextmanager
def _switched(caller: Caller) -> Iterator[None]:
    saved = _capget()
    ids = (_libc.setfsuid(0xFFFFFFFF), _libc.setfsgid(0xFFFFFFFF))
    stage = 0
    try:
        _setgroups(caller.groups)
        stage = 1
        _setfsgid(caller.gid)
        stage = 2
        if caller.uid != 0:
            _setfsuid(caller.uid)  # drops the file system capabilities
            stage = 3
            _set_effective(saved, 0)  # and every other one
            stage = 4
    except BaseException:
        _restore(saved, ids, stage, "a failed switch")
        raise
    try:
        yield
    finally:
        _restore(saved, ids, stage, f"acting as uid {caller.uid}")


def _restore(saved: Caps, ids: tuple[int, int], stage: int, what: str) -> None:
    try:
        if stage >= 4:
            _set_effective(saved, saved[0])
        if stage >= 3:
            _setfsuid(ids[0])
            _set_effective(saved, saved[0])
        if stage >= 2:
            _setfsgid(ids[1])
        if stage >= 1:
            _setgroups(_daemon_groups)
    except BaseException as exc:
        _die(what, exc)


@contextlib.contextmanager
def without_fsetid() -> Iterator[None]:
    """CAP_FSETID out of this thread's effective set within the block.

    A backing file registered with FUSE_DEV_IOC_BACKING_OPEN keeps the credentials
    of the thread that registered it, and the kernel does every passthrough write
    with them: without CAP_FSETID, such a write drops setuid and setgid as the
    store does for an unprivileged writer.
    """
    if not enabled():
        yield
        return
    saved = _capget()
    _set_effective(saved, saved[0] & ~(1 << CAP_FSETID))
    try:
        yield
    finally:
        try:
            _set_effective(saved, saved[0])
        except BaseException as exc:
            _die("registering a backing file", exc)
