"""Taking over a live connection: journal what the kernel knows, restore it in a successor.

:class:`Journal` writes the node, file and directory tables to the state log
(:mod:`scachefs.state`) as they change, before the replies that make the kernel
rely on them. :func:`restore` rebuilds those tables in a new daemon from the
log: each node is reopened by the store's file handle (``open_by_handle_at``)
or, where the store has none, by its path through its restored parent, and
only kept if it is the very object (same device and inode number); each open
file and directory is reopened with its flags. What cannot be found again is
left out: the kernel's requests for it then get ESTALE.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from typing import TYPE_CHECKING

from scachefs import crashpoints, state, syscalls
from scachefs.inodes import ROOT_INODE, Inode
from scachefs.state import FileRecord, NodeRecord, Snapshot, StateError, StateLog

if TYPE_CHECKING:
    from scachefs.passthrough import OpenFile, Passthrough

log = logging.getLogger(__name__)

KIND_CACHED = 1  # served by us through the kernel's page cache
KIND_PASSTHROUGH = 2  # the kernel does its I/O (backing_id)
KIND_LAYER = 4  # a read-only handle of a backing layer, served from the cache
FH_STEP = 1024  # the fh high-water mark is raised in steps: one header write per 1024 opens
# As passthrough._STRIP_OPEN_FLAGS, and O_TRUNC: the file was truncated at its first open.
_REOPEN_STRIP = (os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW
                 | os.O_APPEND)


class Journal:
    """Writes table changes to the state log; compacts it when it grows."""

    def __init__(self, log_: StateLog) -> None:
        self.log = log_
        self.fh_mark = 0
        self.fs: Passthrough | None = None  # whose tables a compaction writes
        self.failed = False  # the state could not keep up: a successor cannot take over

    def _append(self, kind: int, payload: bytes) -> None:
        """Append a record; a full region is compacted at once, never an error for the
        request that wrote it."""
        if self.failed:
            return
        crashpoints.reached("journal-before")
        try:
            self.log.append(kind, payload)
            crashpoints.reached("journal-after")
            return
        except StateError:
            pass
        try:
            if self.fs is not None:
                self.compact(self.fs)
            self.log.append(kind, payload)  # a record of the live tables: replay is idempotent
        except StateError as exc:
            self.failed = True
            self.log.invalidate()
            log.error("the state log is full even after compaction (%s): a restart of the "
                      "daemon will end this mount instead of taking it over", exc)

    def node(self, inode: Inode) -> None:
        if inode.handle is None:
            try:
                inode.handle = syscalls.file_handle(inode.fd)  # in memory: no store I/O
            except OSError:
                inode.handle = b""  # the store has none: restored by path
        self._append(*state.node_record(NodeRecord(
            inode.ino, inode.parent, inode.nlookup, inode.mode, inode.key[0], inode.key[1],
            inode.name, inode.handle)))

    def node_gone(self, ino: int) -> None:
        self._append(*state.gone(state.NODE_GONE, ino))

    def file(self, fh: int, handle: OpenFile, kind: int) -> None:
        self._append(*state.file_record(FileRecord(fh, handle.inode.ino, handle.flags, kind,
                                                      handle.backing_id)))
        if fh >= self.fh_mark:
            self.fh_mark = fh + FH_STEP
            self.log.set_next_fh(self.fh_mark)

    def file_gone(self, fh: int) -> None:
        self._append(*state.gone(state.FILE_GONE, fh))

    def dir(self, fh: int, inode: Inode) -> None:
        self._append(*state.dir_record(fh, inode.ino))
        if fh >= self.fh_mark:
            self.fh_mark = fh + FH_STEP
            self.log.set_next_fh(self.fh_mark)

    def dir_gone(self, fh: int) -> None:
        self._append(*state.gone(state.DIR_GONE, fh))

    def compact_if_needed(self, fs: Passthrough) -> None:
        if not self.failed and self.log.needs_compaction():
            self.compact(fs)

    def compact(self, fs: Passthrough) -> None:
        """Write the live tables as the new log (StateError if they do not fit)."""
        records: list[tuple[int, bytes]] = []
        for inode in fs.table:
            records.append(state.node_record(NodeRecord(
                inode.ino, inode.parent, inode.nlookup, inode.mode, inode.key[0], inode.key[1],
                inode.name, inode.handle or b"")))
        for fh, handle in fs.files.items():
            records.append(state.file_record(FileRecord(fh, handle.inode.ino, handle.flags,
                                                        fs.file_kind(handle),
                                                        handle.backing_id)))
        for fh, d in fs.dirs.items():
            records.append(state.dir_record(fh, d.inode.ino))
        self.log.compact(records)


@dataclasses.dataclass
class Restored:
    """What :func:`restore` brought back, for the log and the stats."""

    nodes: int = 0
    files: int = 0
    dirs: int = 0
    lost_nodes: int = 0
    lost_files: int = 0
    layer_files: list[int] = dataclasses.field(default_factory=list)  # fhs to re-attach


def _open_node(rec: NodeRecord, root_rd: int, parent: Inode | None) -> int | None:
    """An O_PATH descriptor of the recorded object, or None if it is gone (blocking)."""
    fd = None
    if rec.handle:
        try:
            fd = syscalls.open_by_handle(root_rd, rec.handle, os.O_PATH)
        except OSError:
            fd = None
    if fd is None and parent is not None and rec.name:
        try:
            fd = os.open(rec.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        except OSError:
            return None
    if fd is None:
        return None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (rec.dev, rec.ino):
        os.close(fd)  # another object has that name now
        return None
    return fd


def _node_of_kept_file(rec: NodeRecord, snap: Snapshot, kept: dict[int, int]) -> int | None:
    """An O_PATH descriptor of a node that is gone from the store's namespace but kept
    open by the holder (deleted or replaced while open), or None."""
    for fh, frec in snap.files.items():
        fd = kept.get(fh)
        if frec.nodeid != rec.nodeid or fd is None:
            continue
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (rec.dev, rec.ino):
            return os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
    return None


def restore(fs: Passthrough, snap: Snapshot, kept: dict[int, int] | None = None) -> Restored:
    """Rebuild ``fs``'s tables from a snapshot (blocking: run it in a worker thread).

    ``kept``: the holder's copies of the open files' descriptors, by fh (keeper.py).
    An open file uses its copy (taken from ``kept``), so a file deleted or replaced
    on the store while open is still the same file, and so is its node.
    """
    kept = {} if kept is None else kept
    done = Restored()
    root_rd = os.open(fs.table.root.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        pending = dict(snap.nodes)
        root = pending.pop(ROOT_INODE, None)
        if root is not None:
            fs.table.root.nlookup = max(1, root.nlookup)
        # Parents first, so that a node without a file handle can be found by name.
        progress = True
        while pending and progress:
            progress = False
            for nodeid, rec in list(pending.items()):
                parent = fs.table.get(rec.parent) if rec.parent else None
                if rec.parent and parent is None and rec.parent in pending and not rec.handle:
                    continue  # its parent first
                del pending[nodeid]
                progress = True
                fd = _open_node(rec, root_rd, parent)
                if fd is None:
                    fd = _node_of_kept_file(rec, snap, kept)
                if fd is None:
                    done.lost_nodes += 1
                    continue
                inode = Inode(rec.nodeid, fd, (rec.dev, rec.ino), stat.S_IFMT(rec.mode),
                              nlookup=rec.nlookup, parent=rec.parent, name=rec.name,
                              handle=rec.handle)
                fs.table.adopt(inode)
                done.nodes += 1
        done.lost_nodes += len(pending)
        for fh, frec in sorted(snap.files.items()):
            node = fs.table.get(frec.nodeid)
            fd = kept.pop(fh, None)
            if node is None:
                if fd is not None:
                    os.close(fd)
                done.lost_files += 1
                continue
            try:
                if fd is None:
                    fd = os.open(node.proc_path, (frec.flags & ~_REOPEN_STRIP) | os.O_CLOEXEC)
            except OSError:
                done.lost_files += 1
                continue
            handle = fs._new_handle(fd, node, frec.flags)
            if frec.kind & KIND_PASSTHROUGH and frec.backing_id:
                handle.backing_id = frec.backing_id  # still registered in the kernel
                node.backing_id = frec.backing_id
                node.passthrough_opens += 1
            if frec.kind & KIND_CACHED:
                handle.cached = True
                node.cached_opens += 1
            fs.files[fh] = handle
            if frec.kind & KIND_LAYER:
                done.layer_files.append(fh)
            done.files += 1
        for fh, nodeid in snap.dirs.items():
            node = fs.table.get(nodeid)
            if node is None:
                continue
            try:
                fd = os.open(node.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            fs._adopt_dir(fh, fd, node)
            done.dirs += 1
        fs._next_fh = max(snap.next_fh, max([*snap.files, *snap.dirs, 0]) + 1)
    finally:
        os.close(root_rd)
    return done
