"""sd_notify(3) without a dependency: a datagram to $NOTIFY_SOCKET, maybe with a descriptor.

READY=1 and STOPPING=1 for Type=notify units; FDSTORE=1 with a descriptor puts it in
the unit's fd store (see holder.py). Nothing happens when not run by systemd.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import subprocess

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


def own_unit() -> str | None:
    """The systemd service this process runs in (from its cgroup), or None."""
    if not os.environ.get("NOTIFY_SOCKET") and not os.environ.get("INVOCATION_ID"):
        return None
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as cgroups:
            lines = cgroups.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers in ("", "name=systemd"):
            for part in reversed(path.split("/")):
                if part.endswith(".service"):
                    return part
    return None


RESTART_JOBS = ("restart", "try-restart", "reload-or-restart", "reload-or-try-restart")


def restart_pending(timeout: float = 5.0) -> bool:
    """True if systemd is stopping our unit to start it again (a restart job).

    systemd 252 sends a restart's SIGTERM exactly like a stop's; only the unit's job says
    which it is (`systemctl list-jobs`: JOB UNIT TYPE STATE). Anything unclear is a stop.
    """
    unit = own_unit()
    if unit is None:
        return False
    try:
        out = subprocess.run(["systemctl", "list-jobs", "--no-legend", "--plain", "--full",
                              unit], capture_output=True, text=True, timeout=timeout,
                             check=False, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot ask systemd whether %s restarts: %s", unit, exc)
        return False
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit:
            return fields[2] in RESTART_JOBS
    return False
