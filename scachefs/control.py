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
import time
from typing import TYPE_CHECKING, Any

from scachefs import __version__

if TYPE_CHECKING:
    from scachefs.fs import ScacheFS

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


def _counters(stats: Any) -> dict[str, Any]:
    data = dataclasses.asdict(stats)
    data["store_read_hist"] = {str(k): v for k, v in sorted(stats.store_read_hist.items())}
    return data


def stats_document(fs: ScacheFS) -> dict[str, Any]:
    """Everything scachefs-stat shows, as plain JSON-able data."""
    layers = []
    keys = set(fs.shadow.layers()) | set(fs.layers)
    for key in sorted(keys):
        layer = fs.layers.get(key)
        node = fs.shadow.nodes.get(key)
        entry: dict[str, Any] = {
            "path": layer.path if layer else (node.path if node else None),
            "key": f"{key[0]}:{key[1]}",
            "images": len(fs.shadow.images_on(key)),
            "attached": layer is not None,
            "identity_changes": fs.identity_changes[key],
        }
        if layer is not None:
            entry.update(fs.boots.stats(layer))
            buf = layer.buffer
            entry.update(identity="{}:{}:{}:{}".format(*layer.identity), size=buf.size,
                         open_handles=layer.handles, resident_bytes=buf.resident_bytes,
                         hit_ratio=round(buf.stats.hit_ratio(), 4), **_counters(buf.stats))
        else:
            entry.update(size=node.validator[0] if node else None, open_handles=0,
                         resident_bytes=0)
        layers.append(entry)
    cache = fs.cache
    return {
        "schema": SCHEMA,
        "version": __version__,
        "pid": os.getpid(),
        "source": fs.source,
        "mountpoint": fs.mountpoint,
        "uptime_seconds": round(time.time() - fs.started, 3),
        "cache": {"budget_bytes": cache.budget_bytes, "used_bytes": cache.used_bytes,
                  "pinned_bytes": cache.pinned_bytes, "chunk_size": cache.chunk_size,
                  "policy": cache.policy},
        "totals": {**_counters(cache.total), "hit_ratio": round(cache.total.hit_ratio(), 4)},
        "shadow": {"images": len(fs.shadow), "layers": len(keys),
                   "problems": sum(1 for n in fs.shadow.nodes.values() if n.problem)},
        "layers": layers,
    }


def encode_stats(fs: ScacheFS, paths: bool = True) -> bytes:
    """The stats document as compact JSON that fits in one xattr value.

    Without ``paths`` (callers other than root and the mount's owner), layer paths
    are replaced by their inode keys: a path can name a directory the caller may
    not list.
    """
    doc = stats_document(fs)
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

