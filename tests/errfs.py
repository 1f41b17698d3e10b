"""errfs: a failing image store built from real parts, for fault-injection tests.

A small FUSE passthrough of a BACKING directory (scachefs's own
:class:`~scachefs.passthrough.Passthrough` with its inode table), mounted at a
MOUNTPOINT that the tests then use as scachefs's SOURCE. While a fault is armed,
reads (or writes) of chosen byte ranges of chosen files fail with a chosen errno
(EIO by default), exactly as a dying disk or a flaky NFS server would answer.

Control, through extended attributes of the errfs mount root (root only):

- ``setfattr -n user.errfs.faults -v '[{"path": "base.qcow2", "offset": 0,
  "length": 65536}]' MOUNTPOINT`` arms faults (replacing those armed before);
  optional keys: ``"errno"`` (default 5, EIO) and ``"op"`` (``"read"``, the
  default, ``"write"`` or ``"fsync"``; an fsync fault fails every fsync of the
  file whatever the range) and ``"partial": true``: a read that starts before the
  range returns the bytes before it (a short read, as pread(2) on a disk with a
  bad sector does) and only a read starting inside it fails. ``[]`` disarms all.
- ``system.errfs.*`` xattrs are kept by errfs itself, and only a file's owner or
  root may set or remove them (EPERM otherwise), as an NFSv4 server decides for
  ``system.nfs4_acl``: a store that checks such names itself, as the caller.
- ``getfattr -n user.errfs.stats --only-values MOUNTPOINT``: JSON with the armed
  faults and every failure injected so far (path, op, offset, size, errno).

A request fails when its byte range overlaps an armed range of its file; files
are matched by (st_dev, st_ino) when armed, so renames and hard links keep their
fault. Every file is opened with FOPEN_DIRECT_IO so each read a client makes
reaches errfs (no page cache in between hides or repeats a failure), and
attribute and entry timeouts are 0 so files written behind errfs's back are seen
at once.

Run it in the foreground: ``python -m tests.errfs BACKING MOUNTPOINT``; it logs
``errfs mount is live`` once it answers, and unmounts on SIGTERM/SIGINT.
:class:`ErrStore` does that for tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from scachefs.cli import setup_logging
from scachefs.fuse import mount as fuse_mount
from scachefs.fuse.ops import FuseError, Request
from scachefs.fuse.session import Session
from scachefs.inodes import ROOT_INODE
from scachefs.options import MountOptions
from scachefs.passthrough import OpenFile, Passthrough

log = logging.getLogger("errfs")

FAULTS_XATTR = b"user.errfs.faults"
# system.* xattrs that errfs keeps itself and lets only a file's owner (or root) change,
# as an NFSv4 server does with system.nfs4_acl: a store that checks them itself.
SYSTEM_ACL_PREFIX = b"system.errfs."
STATS_XATTR = b"user.errfs.stats"


@dataclasses.dataclass(frozen=True)
class Fault:
    path: str
    key: tuple[int, int]
    offset: int
    length: int
    errno: int = errno.EIO
    op: str = "read"
    partial: bool = False

    def hits(self, key: tuple[int, int], op: str, offset: int, size: int) -> bool:
        return (key == self.key and op == self.op and offset < self.offset + self.length
                and self.offset < offset + max(size, 1))


class ErrFS(Passthrough):
    """The plain passthrough with armed byte ranges that fail."""

    def __init__(self, root_fd: int, options: MountOptions) -> None:
        super().__init__(root_fd, options)
        self.faults: list[Fault] = []
        self.injected: list[dict[str, Any]] = []
        self.requests = 0
        self.system_xattrs: dict[tuple[int, bytes], bytes] = {}

    def _arm(self, value: bytes) -> None:
        try:
            specs = json.loads(value)
            faults = []
            for spec in specs:
                st = os.stat(spec["path"], dir_fd=self.table.root.fd, follow_symlinks=False)
                faults.append(Fault(spec["path"], (st.st_dev, st.st_ino), int(spec["offset"]),
                                    int(spec["length"]), int(spec.get("errno", errno.EIO)),
                                    str(spec.get("op", "read")), bool(spec.get("partial"))))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("bad fault specification %r: %s", value, exc)
            raise FuseError(errno.EINVAL) from None
        self.faults = faults
        log.info("armed faults: %s", [(f.path, f.op, f.offset, f.length, f.errno)
                                      for f in faults])

    def _check(self, fh: int, op: str, offset: int, size: int) -> int:
        """Raise the armed error for a request that hits a fault, or return how many of
        its bytes may be served (fewer than ``size`` for a partial read)."""
        self.requests += 1
        if not self.faults:
            return size
        handle = self.files[fh]
        for fault in self.faults:
            if fault.hits(handle.inode.key, op, offset, size):
                partial = fault.partial and offset < fault.offset
                self.injected.append({"path": fault.path, "op": op, "offset": offset,
                                      "size": size, "errno": fault.errno,
                                      "partial": partial})
                if partial:  # the bytes before the bad range, as a disk's pread returns
                    log.info("injected a short %s of %s at %d+%d: %d bytes", op, fault.path,
                             offset, size, fault.offset - offset)
                    return fault.offset - offset
                log.info("injected %s into %s of %s at %d+%d", errno.errorcode[fault.errno],
                         op, fault.path, offset, size)
                raise FuseError(fault.errno)
        return size

    def _reopen(self, node: Any, flags: int) -> tuple[int, os.stat_result]:
        # The kernel already resolved the name without following it; O_NOFOLLOW on the
        # /proc/self/fd reopen would refuse the magic link with ELOOP (a scachefs bug
        # that test_faults.py reports; errfs must behave as a correct store).
        return super()._reopen(node, flags & ~os.O_NOFOLLOW)

    def _direct_io(self, handle: OpenFile) -> bool:
        return True  # every read reaches errfs: no page cache hides or repeats a failure

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        allowed = self._check(fh, "read", offset, size)
        return await super().read(fh, offset, allowed)

    async def write(self, fh: int, offset: int, data: bytes, kill_suidgid: bool) -> int:
        self._check(fh, "write", offset, len(data))
        return await super().write(fh, offset, data, kill_suidgid)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._check(fh, "fsync", 0, 1 << 62)
        await super().fsync(fh, datasync)

    async def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int,
                       req: Request) -> None:
        if nodeid == ROOT_INODE and name == FAULTS_XATTR:
            if req.uid != 0:
                raise FuseError(errno.EPERM)
            self._arm(value)
            return
        if name.startswith(SYSTEM_ACL_PREFIX):
            self.system_xattrs[(self._owned_by(nodeid, req), name)] = value
            return
        await super().setxattr(nodeid, name, value, flags, req)

    def _owned_by(self, nodeid: int, req: Request) -> int:
        """The node's number if the caller may change its system.errfs.* ACL: its owner
        or root, as an NFSv4 server decides for system.nfs4_acl; EPERM otherwise."""
        node = self._inode(nodeid)
        if req.uid not in (0, os.fstat(node.fd).st_uid):
            raise FuseError(errno.EPERM)
        return nodeid

    async def removexattr(self, nodeid: int, name: bytes, req: Request) -> None:
        if name.startswith(SYSTEM_ACL_PREFIX):
            if self.system_xattrs.pop((self._owned_by(nodeid, req), name), None) is None:
                raise FuseError(errno.ENODATA)
            return
        await super().removexattr(nodeid, name, req)

    async def getxattr(self, nodeid: int, name: bytes, req: Request) -> bytes:
        if nodeid == ROOT_INODE and name == STATS_XATTR:
            doc = {"faults": [dataclasses.asdict(f) for f in self.faults],
                   "injected": self.injected, "requests": self.requests}
            return json.dumps(doc).encode()
        if name.startswith(SYSTEM_ACL_PREFIX):
            value = self.system_xattrs.get((nodeid, name))
            if value is None:
                raise FuseError(errno.ENODATA)
            return value
        return await super().getxattr(nodeid, name, req)


async def _serve(session: Session, mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:

        async def wait_ready() -> None:
            await trio.to_thread.run_sync(os.stat, mountpoint)
            log.info("errfs mount is live")

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    await trio.to_thread.run_sync(fuse_mount.unmount, mountpoint, session.fd)
                    return

        nursery.start_soon(on_signals)
        nursery.start_soon(wait_ready)
        await session.serve()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="errfs", description=__doc__.splitlines()[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    root_fd = os.open(args.backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    os.umask(0)
    # passthrough=off: errfs must see every read and write to fail them on demand.
    ops = ErrFS(root_fd, MountOptions(attr_timeout=0, entry_timeout=0, threads=8,
                                      passthrough="off"))
    mountpoint = os.path.abspath(args.mountpoint)
    fd = fuse_mount.mount(fuse_mount.MountSpec("errfs", mountpoint, "errfs", allow_other=True))
    session = Session(fd, ops, max_tasks=64)
    ops.session = session
    try:
        trio.run(_serve, session, mountpoint)
    finally:
        fuse_mount.unmount(mountpoint, fd)
        os.close(fd)
        log.info("errfs unmounted %s", mountpoint)
    return 0


def _mounted_type(path: Path) -> str | None:
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            fields = line.split()
            if fields[4] == target:
                found = fields[fields.index("-") + 1]
    return found


class ErrStore:
    """An errfs daemon serving ``backing`` at ``mountpoint`` (the tests' failing store)."""

    def __init__(self, backing: Path, mountpoint: Path, log_path: Path) -> None:
        self.backing, self.mountpoint, self.log_path = backing, mountpoint, log_path
        mountpoint.mkdir(exist_ok=True)
        self._log = open(log_path, "ab")  # closed in stop()
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.errfs", str(backing), str(mountpoint)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 20
        while "errfs mount is live" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"errfs did not come up:\n{self.log()}")
            time.sleep(0.05)
        assert _mounted_type(mountpoint) == "fuse.errfs"

    def log(self) -> str:
        """What this daemon logged (the file may hold earlier runs' lines too)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def arm(self, *faults: dict[str, Any]) -> None:
        os.setxattr(self.mountpoint, FAULTS_XATTR, json.dumps(list(faults)).encode())

    def disarm(self) -> None:
        self.arm()

    def stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(os.getxattr(self.mountpoint, STATS_XATTR))
        return doc

    def injected(self) -> list[dict[str, Any]]:
        return list(self.stats()["injected"])

    def kill(self) -> None:
        """SIGKILL the daemon: the store's mount then answers ENOTCONN until unmounted."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if _mounted_type(self.mountpoint) == "fuse.errfs":
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True,
                           check=False)
        self._log.close()


if __name__ == "__main__":
    sys.exit(main())
