"""sd_notify(3) without a dependency: a datagram to $NOTIFY_SOCKET, maybe with a descriptor.

READY=1 and STOPPING=1 for Type=notify units; FDSTORE=1 with a descriptor puts it in
the unit's fd store (see holder.py). Nothing happens when not run by systemd.
"""

from __future__ import annotations

import array
import logging
import os
import socket

log = logging.getLogger(__name__)


def sd_notify(message: str, fd: int | None = None) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    ancillary = []
    if fd is not None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendmsg([message.encode()], ancillary, 0, address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)
