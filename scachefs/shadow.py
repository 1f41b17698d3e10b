"""The shadow: which store file is a backing layer of which image.

Every image scachefs has looked at is a node keyed by its store identity
``(st_dev, st_ino)``; an edge points from an image to the file its header names
as backing file, resolved the way qemu resolves it (relative names from the
image's directory, absolute names through the mount or source prefix). A file
that some image names as its backing file is a **backing layer**, at every depth
of a chain. qemu opens an overlay before its backing files, so probing each
image when it is opened discovers every chain in use; a scan at mount time fills
in the rest for statistics and prefetch.

Probing (header reads, name resolution) blocks and runs in worker threads; the
graph itself lives in the trio thread.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
from collections.abc import Iterator

from scachefs import syscalls
from scachefs.qcow2 import ImageFormatError, ImageInfo, read_image_info

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (st_dev, st_ino) of a store object
MAX_CHAIN = 64  # deeper chains are treated as loops


def key_of(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino)


def validator_of(st: os.stat_result) -> tuple[int, int, int]:
    """What must stay equal for a probe result to remain valid."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclasses.dataclass
class ImageNode:
    """What one probe of one file found."""

    key: Key
    path: str  # store-relative, as last seen; for logs and stats
    validator: tuple[int, int, int]
    info: ImageInfo | None = None
    backing: Key | None = None
    problem: str | None = None


def _display(path: bytes | None) -> str:
    return "<unknown path>" if path is None else os.fsdecode(path) or "."


def probe_image(fd: int, st: os.stat_result, root_fd: int, relpath: bytes | None,
                prefixes: tuple[bytes, ...]) -> ImageNode:
    """Read an image header and resolve its backing file inside the store (blocking).

    ``relpath`` is the image's store-relative path (None if unknown), ``prefixes``
    the absolute paths under which the store is reachable (mount point, source).
    Never raises for bad input: problems end up in ``ImageNode.problem``.
    """
    node = ImageNode(key_of(st), _display(relpath), validator_of(st))
    if not stat.S_ISREG(st.st_mode):
        return node
    try:
        node.info = read_image_info(lambda off, n: os.pread(fd, n, off), st.st_size)
    except ImageFormatError as exc:
        node.problem = f"malformed qcow2 header: {exc}"
        return node
    except OSError as exc:
        node.problem = f"cannot read the header: {exc.strerror}"
        return node
    name = node.info.backing_file
    if name is None:
        return node
    shown = name.decode(errors="backslashreplace")
    if name.startswith(b"/"):
        rel = None
        for prefix in prefixes:
            if name.startswith(prefix.rstrip(b"/") + b"/"):
                rel = name[len(prefix.rstrip(b"/")) + 1:]
                break
        if rel is None:
            node.problem = f"backing file {shown} is outside the store"
            return node
    elif relpath is None:
        node.problem = f"backing file {shown}: the image's directory is not known"
        return node
    else:
        directory = relpath.rpartition(b"/")[0]
        rel = directory + b"/" + name if directory else name
    try:
        backing_fd = syscalls.open_beneath(root_fd, rel, os.O_PATH)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            node.problem = f"backing file {shown} resolves outside the store"
        elif exc.errno == errno.ENOENT:
            node.problem = f"backing file {shown} does not exist"
        else:
            node.problem = f"backing file {shown}: {exc.strerror}"
        return node
    try:
        backing_st = os.fstat(backing_fd)
    finally:
        os.close(backing_fd)
    if not stat.S_ISREG(backing_st.st_mode):
        node.problem = f"backing file {shown} is not a regular file"
    elif key_of(backing_st) == node.key:
        node.problem = f"backing loop: {node.path} names itself as backing file"
    else:
        node.backing = key_of(backing_st)
    return node


def scan_store(root_fd: int, prefixes: tuple[bytes, ...],
               skip: frozenset[bytes] = frozenset()) -> list[ImageNode]:
    """Probe every regular file of the store (blocking; run in a worker thread).

    Top-level names in ``skip`` (e.g. ``.scache``) are not entered.
    """
    nodes: list[ImageNode] = []
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(b".", dir_fd=root_fd):
        rel_dir = b"" if dirpath == b"." else dirpath[2:]
        if not rel_dir:
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                             dir_fd=dir_fd)
            except OSError:
                continue  # symlinks, sockets, vanished or unreadable files
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size >= 4:
                    rel = rel_dir + b"/" + name if rel_dir else name
                    nodes.append(probe_image(fd, st, root_fd, rel, prefixes))
            finally:
                os.close(fd)
    return nodes


class Shadow:
    """The graph of image stacks: nodes, backing edges, and the set of layers."""

    def __init__(self) -> None:
        self.nodes: dict[Key, ImageNode] = {}
        self._backed_by: dict[Key, set[Key]] = {}  # layer -> images naming it

    def __len__(self) -> int:
        return len(self.nodes)

    def is_layer(self, key: Key) -> bool:
        return bool(self._backed_by.get(key))

    def layers(self) -> Iterator[Key]:
        return (key for key, users in self._backed_by.items() if users)

    def images_on(self, key: Key) -> set[Key]:
        """The images that name this layer as their backing file."""
        return set(self._backed_by.get(key, ()))

    def needs_probe(self, st: os.stat_result) -> bool:
        node = self.nodes.get(key_of(st))
        return node is None or node.validator != validator_of(st)

    def path_of(self, key: Key) -> str | None:
        node = self.nodes.get(key)
        return node.path if node else None

    def update(self, node: ImageNode) -> None:
        """Record a probe result, replacing what was known of that file."""
        old = self.nodes.get(node.key)
        if old is not None and old.backing is not None:
            self._unlink(old.key, old.backing)
        if node.backing is not None:
            cycle = self._cycle_through(node.key, node.backing)
            if cycle is not None:
                # No member of a loop is a layer: qemu cannot open any of them either.
                node.problem = "backing loop: " + " -> ".join(
                    self.path_of(k) or str(k) for k in cycle)
                for member in cycle[1:]:
                    other = self.nodes.get(member)
                    if other is not None and other.backing is not None:
                        self._unlink(member, other.backing)
                        other.backing, other.problem = None, node.problem
                node.backing = None
        self.nodes[node.key] = node
        if node.backing is not None:
            self._backed_by.setdefault(node.backing, set()).add(node.key)
        changed = old is None or (old.problem, old.backing) != (node.problem, node.backing)
        if node.problem and changed:
            log.warning("%s: %s; serving it as a plain file", node.path, node.problem)
        elif node.backing is not None and changed:
            log.debug("%s is backed by %s", node.path, self.path_of(node.backing) or node.backing)

    def remove(self, key: Key) -> None:
        """Forget a file that no longer exists."""
        node = self.nodes.pop(key, None)
        if node is not None and node.backing is not None:
            self._unlink(key, node.backing)

    def _unlink(self, image: Key, layer: Key) -> None:
        users = self._backed_by.get(layer)
        if users is not None:
            users.discard(image)
            if not users:
                del self._backed_by[layer]

    def _cycle_through(self, image: Key, backing: Key) -> list[Key] | None:
        """The chain image -> backing -> ... if it comes back to image or is too deep."""
        chain = [image, backing]
        current = backing
        for _ in range(MAX_CHAIN):
            node = self.nodes.get(current)
            if node is None or node.backing is None:
                return None
            current = node.backing
            if current == image:
                return [*chain, image]
            chain.append(current)
        return chain


__all__ = ["ImageNode", "Key", "Shadow", "key_of", "probe_image",
           "scan_store", "validator_of"]
