"""The control channel: extended attributes of the mount root (the S3QL pattern).

Tools reach a live mount by its mount point alone:

- ``getxattr(MOUNTPOINT, "user.scachefs.stats")`` returns the statistics as a
  versioned JSON document (``"schema": 1``). The kernel only lets through callers
  who may read the mount root, so whoever can read the root can read the stats.
- ``setxattr(MOUNTPOINT, "user.scachefs.command", JSON)`` runs an action; the
  daemon itself checks that the caller is root or the mount's owner.

These names never reach the store; every other xattr of the root passes through.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

STATS_XATTR = b"user.scachefs.stats"
COMMAND_XATTR = b"user.scachefs.command"
SCHEMA = 1
XATTR_SIZE_MAX = 65536  # the kernel's limit for one xattr value


class ControlError(Exception):
    """A refused or malformed control request; ``errno`` is what the caller gets."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def counters(stats: Any) -> dict[str, Any]:
    """A LayerStats as JSON-able data."""
    data = dataclasses.asdict(stats)
    data["store_read_hist"] = {str(k): v for k, v in sorted(stats.store_read_hist.items())}
    return data


def encode_stats(doc: dict[str, Any], paths: bool = True) -> bytes:
    """The stats document as compact JSON that fits in one xattr value.

    Without ``paths`` (callers other than root and the mount's owner), layer paths
    are replaced by their inode keys: a path can name a directory the caller may
    not list.
    """
    if not paths:
        for layer in doc["layers"]:
            layer["path"] = f"inode {layer['key']}"
        doc["paths_hidden"] = True
    data = json.dumps(doc, separators=(",", ":")).encode()
    if len(data) > XATTR_SIZE_MAX:
        # Keep the busiest layers; say so in the document.
        doc["layers"].sort(key=lambda layer: -layer.get("resident_bytes", 0))
        while len(data) > XATTR_SIZE_MAX and doc["layers"]:
            doc["layers"] = doc["layers"][: len(doc["layers"]) * 3 // 4]
            doc["layers_truncated"] = True
            data = json.dumps(doc, separators=(",", ":")).encode()
    return data


def may_act(uid: int, owner_uid: int) -> bool:
    """Actions are for root and for the user who owns the mount."""
    return uid == 0 or uid == owner_uid


def optional_str(args: dict[str, Any], name: str) -> str | None:
    """An optional string argument; ControlError(EINVAL) if it is something else."""
    value = args.get(name)
    if value is not None and not isinstance(value, str):
        raise ControlError(errno.EINVAL, f"{name} must be a string")
    return value


def store_path(args: dict[str, Any], prefixes: tuple[bytes, ...]) -> bytes:
    """The ``path`` argument as a path relative to the store; ControlError(EINVAL) if bad.

    JSON strings can hold what no file name can (lone surrogates, NUL); an absolute
    path must lie under the mount point or the source.
    """
    path = args.get("path")
    if not isinstance(path, str) or not path:
        raise ControlError(errno.EINVAL, 'this action needs {"path": "..."}')
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:
        raise ControlError(errno.EINVAL, f"path {path!r} is not a valid file name") from None
    if b"\0" in raw:
        raise ControlError(errno.EINVAL, f"path {path!r} contains a NUL byte")
    if raw.startswith(b"/"):
        for prefix in prefixes:
            if raw.startswith(prefix.rstrip(b"/") + b"/"):
                return raw[len(prefix.rstrip(b"/")) + 1:]
        raise ControlError(errno.EINVAL, f"path {path!r} is outside the mount; give it "
                                         "relative to the mount point")
    return raw


def parse_command(value: bytes) -> tuple[str, dict[str, Any]]:
    """Parse ``{"action": NAME, ...}``; ControlError(EINVAL) for anything else."""
    try:
        request = json.loads(value.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError(errno.EINVAL, f"control request is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("action"), str):
        raise ControlError(errno.EINVAL, 'control request needs {"action": "..."}')
    action = request.pop("action")
    return action, request

