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
        "allow_other": fs.options.allow_other,
        "trace_dir": (fs.options.trace_dir or os.path.join(fs.source, ".scache", "traces"))
        if fs.boots.store is not None else None,
        "uptime_seconds": round(time.time() - fs.started, 3),
        "fds": {"in_use": fs.fds_in_use(), "limit": fs.fd_limit},
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

