"""The inode table: one entry per store object the kernel knows, as in libfuse's passthrough_hp.

Each entry holds an ``O_PATH`` file descriptor of the store object, so every later
access goes through ``*at`` calls or ``/proc/self/fd`` relative to that descriptor:
no path strings are joined and reopened, renames in the store cannot redirect us,
and an object cannot be swapped under us. Entries are keyed by the store object's
``(st_dev, st_ino)``, so hard links share one entry, and are freed when the kernel's
lookup count reaches zero (``forget``).

Inode numbers are the store's ``st_ino`` where that is unique (same device as the
source and not the FUSE root number), so ``ls -i`` and tools that compare inode
numbers see stable values across remounts; others get numbers from a private range.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Callable, Iterator

ROOT_INODE = 1  # FUSE_ROOT_ID
_PRIVATE_BASE = 1 << 63  # numbers for objects on other devices or colliding with ROOT_INODE

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Inode:
    """A store object the kernel holds a reference to."""

    ino: int
    fd: int  # O_PATH | O_NOFOLLOW descriptor of the store object
    key: tuple[int, int]  # (st_dev, st_ino) in the store
    mode: int  # file type bits; the type of an object never changes
    nlookup: int = 0
    # Where the kernel last found this object: (parent inode number, name). Used to
    # resolve relative backing file names the way qemu does, from the image's directory.
    parent: int = 0
    name: bytes = b""
    # Until when (monotonic) the object is known to have no security.capability xattr.
    no_caps_until: float = 0.0
    # Until when (monotonic) it is known to have no POSIX access ACL (FUSE_POSIX_ACL: the
    # kernel asks at permission checks, again after each revalidation).
    no_acl_until: float = 0.0
    # The layer identity the kernel's page cache of this inode holds, if known: an open
    # may let the kernel keep its pages (keep_cache) only when they are of this identity.
    page_identity: tuple[int, int, int, int] | None = None
    # Passthrough (see passthrough.py): the backing file the kernel does this inode's
    # I/O with while passthrough_opens > 0, and opens we serve through its page cache.
    backing_id: int = 0
    passthrough_opens: int = 0
    cached_opens: int = 0
    handle: bytes | None = None  # the store's file handle (b"": it has none), once asked

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def proc_path(self) -> str:
        """A path that reaches exactly this object, never following names in the store."""
        return f"/proc/self/fd/{self.fd}"


def _nothing(_: object) -> None:
    pass


class InodeTable:
    """Maps FUSE inode numbers to store objects and keeps their lookup counts."""

    def __init__(self, root_fd: int, root_stat: os.stat_result) -> None:
        self.root_dev = root_stat.st_dev
        self.root = Inode(ROOT_INODE, root_fd, (root_stat.st_dev, root_stat.st_ino),
                          root_stat.st_mode, nlookup=1)
        self._by_ino: dict[int, Inode] = {ROOT_INODE: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {self.root.key: self.root}
        self._next_private = _PRIVATE_BASE
        # Told of every change the kernel can see (a count, a name), for the state a
        # restarted daemon takes over: changed(inode) before the reply, gone(ino) after.
        self.changed: Callable[[Inode], None] = _nothing
        self.gone: Callable[[int], None] = _nothing

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def number_for(self, st: os.stat_result) -> int:
        """The inode number an object has or would get; used for ``..`` in readdir."""
        known = self._by_key.get((st.st_dev, st.st_ino))
        if known is not None:
            return known.ino
        if st.st_dev == self.root_dev and st.st_ino != ROOT_INODE:
            return st.st_ino
        return 0

    def ref(self, fd: int, st: os.stat_result, parent: int = 0, name: bytes = b"") -> Inode:
        """Count one kernel lookup of ``name`` in ``parent``: the object behind ``fd``.

        ``fd`` is an O_PATH descriptor we now own; if the object is already known it
        is closed and the existing entry is used.
        """
        key = (st.st_dev, st.st_ino)
        inode = self._by_key.get(key)
        if inode is not None:
            os.close(fd)
        else:
            ino = st.st_ino
            if st.st_dev != self.root_dev or ino == ROOT_INODE or ino >= _PRIVATE_BASE:
                ino = self._next_private
                self._next_private += 1
            inode = Inode(ino, fd, key, stat.S_IFMT(st.st_mode))
            self._by_ino[ino] = inode
            self._by_key[key] = inode
        inode.nlookup += 1
        if parent:
            inode.parent, inode.name = parent, name
        self.changed(inode)
        return inode

    def adopt(self, inode: Inode) -> None:
        """Take an entry a previous daemon created (same number), on takeover."""
        if inode.ino == ROOT_INODE:
            self.root.nlookup = inode.nlookup
            return
        self._by_ino[inode.ino] = inode
        self._by_key[inode.key] = inode
        if inode.ino >= _PRIVATE_BASE:
            self._next_private = max(self._next_private, inode.ino + 1)

    def __iter__(self) -> Iterator[Inode]:
        return iter(list(self._by_ino.values()))

    def find(self, st: os.stat_result) -> Inode | None:
        """The entry of a store object, if the kernel knows it."""
        return self._by_key.get((st.st_dev, st.st_ino))

    def child(self, parent: int, name: bytes) -> Inode | None:
        """The entry the kernel knows as ``name`` in directory ``parent`` (a scan: for
        rare paths only)."""
        for inode in self._by_ino.values():
            if inode.parent == parent and inode.name == name:
                return inode
        return None

    def by_key(self, key: tuple[int, int]) -> Inode | None:
        """The entry of the store object ``(st_dev, st_ino)``, if the kernel knows it."""
        return self._by_key.get(key)

    def relpath(self, inode: Inode) -> bytes | None:
        """The object's path relative to the store root, from the names the kernel used.

        None when an ancestor is no longer known (the kernel pins the ancestors of
        every object it references, so this is rare).
        """
        parts: list[bytes] = []
        node = inode
        for _ in range(4096):
            if node is self.root:
                return b"/".join(reversed(parts))
            parts.append(node.name)
            parent = self._by_ino.get(node.parent)
            if parent is None or not node.name:
                return None
            node = parent
        return None

    def forget(self, ino: int, count: int) -> None:
        """Drop ``count`` kernel references; the entry and its fd go when none remain.

        Never raises: the kernel does not wait for an answer to forget.
        """
        inode = self._by_ino.get(ino)
        if inode is None or inode is self.root:
            return
        inode.nlookup -= count
        if inode.nlookup > 0:
            self.changed(inode)
            return
        if inode.nlookup < 0:
            log.warning("inode %d forgotten more often than looked up", ino)
        del self._by_ino[ino]
        del self._by_key[inode.key]
        self.gone(ino)
        try:
            os.close(inode.fd)
        except OSError as exc:  # pragma: no cover - closing an O_PATH fd does not fail
            log.warning("closing fd of inode %d: %s", ino, exc)
