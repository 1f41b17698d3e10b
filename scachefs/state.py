"""State that outlives the daemon: what the kernel knows of us, in a memfd the holder keeps.

A restarted daemon takes over a live /dev/fuse connection; the kernel still
holds our node ids, file handles and backing ids, and it negotiated INIT once.
This module keeps all of that in shared memory (a memfd the holder process
owns), written so that the daemon can die at any instant and leave it
consistent:

- a 4 KiB header: magic, the negotiated INIT, the fh high-water mark, the
  daemon's generation and the last restart's cause, and which of two log
  regions is active;
- two log regions; the active one is an append-only log of records (a node's
  whole state, a node gone, an open file, a file gone, ...). Each record carries
  the region's epoch, a sequence number and an xxh3 checksum; a reader replays
  records until the first one that does not check out (a torn tail);
- compaction writes a snapshot of the live tables into the other region with a
  new epoch, then flips the active index with one aligned 4-byte store.

Records are written before the reply that makes the kernel rely on them (a
lookup's node before its entry reply), so the state never knows less than the
kernel; it may know more (a forget not yet logged), which only leaks a count.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from collections.abc import Iterator

import xxhash

from scachefs import crashpoints

MAGIC = b"SCSTATE1"
HEADER_SIZE = 4096
REGION_SIZE = 256 << 20  # sparse: only written pages take memory
# compact once the active log holds this many bytes (tests may lower it) ...
COMPACT_AT = int(os.environ.get("SCACHEFS_COMPACT_AT", 8 << 20))
COMPACT_RATIO = 4  # ... and is this many times the size of a snapshot

# header: magic, version, active region, generation, restarts, proto_minor, flags,
# passthrough, next_fh, last restart time (unix ns), cause length; then the cause text
_HEADER = struct.Struct("<8sIIQQIQIQQI")
_CAUSE_AT = _HEADER.size
_NEXT_FH_AT = 48  # offset of next_fh in _HEADER
_CAUSE_MAX = 256
_REGION_HEAD = struct.Struct("<8sQ")  # magic, epoch
_RECORD = struct.Struct("<IHHQQ")  # length of payload, type, 0, epoch, sequence
_CHECK = struct.Struct("<Q")
_REGION_MAGIC = b"SCLOG001"

# record types
NODE, NODE_GONE, FILE, FILE_GONE, DIR, DIR_GONE = range(1, 7)
_NODE = struct.Struct("<QQQIQQHH")  # nodeid parent nlookup mode dev ino namelen handlelen
_FILE = struct.Struct("<QQIBi")  # fh nodeid flags kind backing_id
_DIR = struct.Struct("<QQ")  # fh nodeid
_GONE = struct.Struct("<Q")

FILE_DAEMON, FILE_CACHED, FILE_PASSTHROUGH, FILE_LAYER = 0, 1, 2, 3


class StateError(Exception):
    """The state cannot be trusted (wrong magic, version, or no valid log)."""


@dataclasses.dataclass
class NodeRecord:
    nodeid: int
    parent: int
    nlookup: int
    mode: int
    dev: int
    ino: int
    name: bytes
    handle: bytes  # the store's file handle (empty: none; resolve by path)


@dataclasses.dataclass
class FileRecord:
    fh: int
    nodeid: int
    flags: int
    kind: int  # FILE_*
    backing_id: int


@dataclasses.dataclass
class Snapshot:
    """What a successor restores: the header's facts and the replayed tables."""

    generation: int
    restarts: int
    proto_minor: int
    flags: int
    passthrough: bool
    next_fh: int
    last_restart_ns: int
    cause: str
    nodes: dict[int, NodeRecord]
    files: dict[int, FileRecord]
    dirs: dict[int, int]  # fh -> nodeid


def create_memfd(name: str) -> int:
    """A new memfd of the state's size (sparse), not inherited across exec."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, HEADER_SIZE + 2 * REGION_SIZE)
    return fd


class StateLog:
    """The state memfd, mapped: a header and two log regions."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, HEADER_SIZE + 2 * REGION_SIZE)
        self._active = 0
        self._epoch = 0
        self._seq = 0
        self._end = 0  # offset of the next record in the active region
        self._snapshot_bytes = 0

    # ---------------------------------------------------------------- header
    def initialized(self) -> bool:
        return self._map[:8] == MAGIC

    def start(self, proto_minor: int, flags: int, passthrough: bool) -> None:
        """A fresh connection: write the header and an empty log (generation 0)."""
        self._write_region(0, 1, [])
        self._write_header(active=0, generation=0, restarts=0, proto_minor=proto_minor,
                           flags=flags, passthrough=passthrough, next_fh=1, restart_ns=0,
                           cause="")
        self._map[:8] = MAGIC  # last: a crash before this leaves "not initialized"

    def _write_header(self, *, active: int, generation: int, restarts: int, proto_minor: int,
                      flags: int, passthrough: bool, next_fh: int, restart_ns: int,
                      cause: str) -> None:
        raw = cause.encode()[:_CAUSE_MAX]
        _HEADER.pack_into(self._map, 0, bytes(self._map[:8]), 1, active, generation,
                          restarts, proto_minor, flags, int(passthrough), next_fh,
                          restart_ns, len(raw))
        self._map[_CAUSE_AT:_CAUSE_AT + len(raw)] = raw

    def _header(self) -> tuple[int, ...]:
        if not self.initialized():
            raise StateError("no state (the connection was never initialized)")
        fields = _HEADER.unpack_from(self._map, 0)
        if fields[1] != 1:
            raise StateError(f"state version {fields[1]} is not 1")
        return tuple(fields[2:])

    def set_next_fh(self, value: int) -> None:
        """Raise the fh high-water mark (one 8-byte store; never lowered)."""
        struct.pack_into("<Q", self._map, _NEXT_FH_AT, value)

    def begin_generation(self, cause: str, now_ns: int) -> int:
        """A successor took over: count it, remember why; returns the new generation."""
        (active, generation, restarts, minor, flags, passthrough, next_fh, _,
         _) = self._header()
        self._write_header(active=active, generation=generation + 1, restarts=restarts + 1,
                           proto_minor=minor, flags=flags, passthrough=bool(passthrough),
                           next_fh=next_fh, restart_ns=now_ns, cause=cause)
        return int(generation + 1)

    # ------------------------------------------------------------------- log
    def _region(self, index: int) -> int:
        return HEADER_SIZE + index * REGION_SIZE

    def _write_region(self, index: int, epoch: int, records: list[tuple[int, bytes]]) -> int:
        base = self._region(index)
        offset = _REGION_HEAD.size
        for seq, (kind, payload) in enumerate(records):
            offset = self._put(base, offset, epoch, seq, kind, payload)
        # The head last: until it names the new epoch, no record of it is trusted.
        _REGION_HEAD.pack_into(self._map, base, _REGION_MAGIC, epoch)
        self._active, self._epoch, self._seq, self._end = index, epoch, len(records), offset
        return offset

    def _put(self, base: int, offset: int, epoch: int, seq: int, kind: int,
             payload: bytes) -> int:
        head = _RECORD.pack(len(payload), kind, 0, epoch, seq)
        body = head + payload
        end = offset + len(body) + _CHECK.size
        if end > REGION_SIZE:
            raise StateError("state log region full")
        self._map[base + offset:base + offset + len(body)] = body
        _CHECK.pack_into(self._map, base + offset + len(body), xxhash.xxh3_64_intdigest(body))
        return end

    def append(self, kind: int, payload: bytes) -> None:
        self._end = self._put(self._region(self._active), self._end, self._epoch, self._seq,
                              kind, payload)
        self._seq += 1

    def needs_compaction(self) -> bool:
        return (self._end > COMPACT_AT
                and self._end > COMPACT_RATIO * max(self._snapshot_bytes, min(COMPACT_AT, 1 << 16)))

    def compact(self, records: list[tuple[int, bytes]]) -> None:
        """Write the live tables to the other region, then make it the active one."""
        (_, generation, restarts, minor, flags, passthrough, next_fh, restart_ns,
         _) = self._header()
        cause = self.cause()
        other = 1 - self._active
        self._snapshot_bytes = self._write_region(other, self._epoch + 1, records)
        crashpoints.reached("compact")  # the new region is written, not yet the active one
        self._write_header(active=other, generation=generation, restarts=restarts,
                           proto_minor=minor, flags=flags, passthrough=bool(passthrough),
                           next_fh=next_fh, restart_ns=restart_ns, cause=cause)

    def invalidate(self) -> None:
        """Mark the state unusable: a successor then lets the connection go (ENOTCONN)
        instead of restoring tables that miss a change."""
        self._map[:8] = b"\0" * 8

    def cause(self) -> str:
        length = _HEADER.unpack_from(self._map, 0)[-1]
        return bytes(self._map[_CAUSE_AT:_CAUSE_AT + min(length, _CAUSE_MAX)]).decode(
            errors="replace")

    def _records(self, index: int) -> Iterator[tuple[int, bytes]]:
        base = self._region(index)
        magic, epoch = _REGION_HEAD.unpack_from(self._map, base)
        if magic != _REGION_MAGIC:
            raise StateError("the active state log has no valid head")
        offset, seq = _REGION_HEAD.size, 0
        while offset + _RECORD.size + _CHECK.size <= REGION_SIZE:
            length, kind, _, rec_epoch, rec_seq = _RECORD.unpack_from(self._map, base + offset)
            end = offset + _RECORD.size + length
            if rec_epoch != epoch or rec_seq != seq or end + _CHECK.size > REGION_SIZE:
                break
            body = bytes(self._map[base + offset:base + end])
            (check,) = _CHECK.unpack_from(self._map, base + end)
            if xxhash.xxh3_64_intdigest(body) != check:
                break  # a torn record: the daemon died while writing it
            yield kind, body[_RECORD.size:]
            offset, seq = end + _CHECK.size, seq + 1
        self._active, self._epoch, self._seq, self._end = index, epoch, seq, offset

    def load(self) -> Snapshot:
        """Replay the active log; StateError if the state cannot be trusted."""
        (active, generation, restarts, minor, flags, passthrough, next_fh, restart_ns,
         _) = self._header()
        if active not in (0, 1):
            raise StateError(f"bad active region {active}")
        nodes: dict[int, NodeRecord] = {}
        files: dict[int, FileRecord] = {}
        dirs: dict[int, int] = {}
        try:
            for kind, payload in self._records(active):
                if kind == NODE:
                    node = decode_node(payload)
                    nodes[node.nodeid] = node
                elif kind == NODE_GONE:
                    nodes.pop(_GONE.unpack(payload)[0], None)
                elif kind == FILE:
                    file = FileRecord(*_FILE.unpack(payload))
                    files[file.fh] = file
                elif kind == FILE_GONE:
                    files.pop(_GONE.unpack(payload)[0], None)
                elif kind == DIR:
                    fh, nodeid = _DIR.unpack(payload)
                    dirs[fh] = nodeid
                elif kind == DIR_GONE:
                    dirs.pop(_GONE.unpack(payload)[0], None)
                else:
                    raise StateError(f"unknown state record type {kind}")
        except struct.error as exc:
            raise StateError(f"malformed state record: {exc}") from None
        # What a compaction would write now: the live tables, not the log just replayed
        # (which would let the threshold grow with every takeover).
        self._snapshot_bytes = _REGION_HEAD.size + sum(
            _RECORD.size + len(payload) + _CHECK.size for _, payload in (
                *(node_record(n) for n in nodes.values()),
                *(file_record(f) for f in files.values()),
                *(dir_record(fh, nodeid) for fh, nodeid in dirs.items())))
        return Snapshot(int(generation), int(restarts), int(minor), int(flags),
                        bool(passthrough), int(next_fh), int(restart_ns), self.cause(),
                        nodes, files, dirs)

    def close(self) -> None:
        self._map.close()


# ----------------------------------------------------------------- records
def node_record(node: NodeRecord) -> tuple[int, bytes]:
    return NODE, (_NODE.pack(node.nodeid, node.parent, node.nlookup, node.mode, node.dev,
                             node.ino, len(node.name), len(node.handle))
                  + node.name + node.handle)


def decode_node(payload: bytes) -> NodeRecord:
    nodeid, parent, nlookup, mode, dev, ino, namelen, handlelen = _NODE.unpack_from(payload)
    rest = payload[_NODE.size:]
    if len(rest) != namelen + handlelen:
        raise StateError("malformed node record")
    return NodeRecord(nodeid, parent, nlookup, mode, dev, ino, rest[:namelen], rest[namelen:])


def file_record(file: FileRecord) -> tuple[int, bytes]:
    return FILE, _FILE.pack(file.fh, file.nodeid, file.flags, file.kind, file.backing_id)


def dir_record(fh: int, nodeid: int) -> tuple[int, bytes]:
    return DIR, _DIR.pack(fh, nodeid)


def gone(kind: int, key: int) -> tuple[int, bytes]:
    return kind, _GONE.pack(key)
