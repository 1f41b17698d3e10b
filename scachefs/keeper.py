"""Open files outlive the daemon: the holder keeps a copy of every open file's descriptor.

Only the daemon holds the store descriptor behind a file the kernel has open (a VM's
base, an overlay). If the daemon dies, a file deleted or replaced on the store meanwhile
(Nova replaces bases by rename under running VMs) would go with it, and its successor
could not reopen it. So the daemon sends a copy of each open file's descriptor to the
holder (SCM_RIGHTS over a SOCK_SEQPACKET pair) before it answers the open, and tells
it when the file is released; the holder hands every copy it keeps to the next daemon
when that one starts.

Messages are ``(op, fh)``: ``K`` keep (one descriptor attached), ``D`` drop, and from
the holder at a daemon's start ``H`` (one descriptor) per kept file, then ``E``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading

log = logging.getLogger(__name__)

_MSG = struct.Struct("<cQ")


def pair() -> tuple[socket.socket, socket.socket]:
    """(holder end, daemon end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class Kept:
    """The holder's side: the descriptors it keeps, by fh, across daemon generations."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def serve(self, sock: socket.socket) -> None:
        """Hand what is kept to a new daemon, then follow its keeps and drops until it
        ends (blocking: the holder runs it in a thread per daemon)."""
        try:
            with self._lock:
                kept = list(self.fds.items())
            for fh, fd in kept:
                socket.send_fds(sock, [_MSG.pack(b"H", fh)], [fd])
            sock.send(_MSG.pack(b"E", 0))
            while True:
                data, fds, _, _ = socket.recv_fds(sock, _MSG.size, 1)
                if not data:
                    return  # the daemon ended
                op, fh = _MSG.unpack(data)
                with self._lock:
                    old = self.fds.pop(fh, None)
                    if op == b"K" and fds:
                        self.fds[fh] = fds.pop()
                if old is not None:
                    os.close(old)
                for fd in fds:
                    os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                log.warning("keeping the daemon's open files failed: %s", exc)
        finally:
            sock.close()

    def close(self) -> None:
        with self._lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()


class Keeper:
    """The daemon's side: report opens and releases; receive what the holder kept."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self._broken = False

    def received(self) -> dict[int, int]:
        """The descriptors the holder kept for the previous daemons' open files (at start,
        before serving: blocking)."""
        kept: dict[int, int] = {}
        while True:
            data, fds, _, _ = socket.recv_fds(self.sock, _MSG.size, 1)
            if not data:
                break
            op, fh = _MSG.unpack(data)
            if op == b"E":
                break
            for fd in fds:
                os.set_inheritable(fd, False)
                if op == b"H" and fh not in kept:
                    kept[fh] = fd
                else:
                    os.close(fd)
        self.sock.setblocking(False)  # from now on the trio thread sends: never wait
        return kept

    def keep(self, fh: int, fd: int) -> None:
        self._send(_MSG.pack(b"K", fh), [fd])

    def drop(self, fh: int) -> None:
        self._send(_MSG.pack(b"D", fh), [])

    def _send(self, msg: bytes, fds: list[int]) -> None:
        if self._broken:
            return
        try:
            socket.send_fds(self.sock, [msg], fds)
        except OSError as exc:
            self._broken = True
            log.warning("cannot give the holder a copy of an open file (%s): files deleted "
                        "on the store while open will not survive a restart of the daemon",
                        exc)
