"""Boot traces: what boots read from a layer, stored safely in the store, merged into a working set.

A trace file holds the recent boots one host recorded for one layer. Files live
in the trace directory (``SOURCE/.scache/traces`` by default), named
``ino-<layer inode>.<host>.trace``: hosts never write the same file, every host
that mounts the store reads them all, and a layer keeps its traces across
renames and hard links. Each entry carries the xxh3 digest of the chunk it saw,
so a trace of a layer that changed since is detected chunk by chunk at prefetch.

File format, version 1, little-endian::

    header   magic "SCTRACE\\0", version u16, reserved u16, chunk_size u32,
             layer ino u64, layer size u64, layer mtime_ns u64, host 64 bytes
             (UTF-8, NUL padded), boots u32, entries u32
    boots    boots x (started unix seconds u64, duration_ms u32, requests u32,
             bytes u64, entries u32)
    entries  entries x (chunk index u64, first access ms u32, xxh3_64 digest u64)
    trailer  xxh3_64 of everything before it, u64

Readers reject anything malformed with :class:`TraceError` (never another
exception), so a corrupt file is logged and ignored, never trusted.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from collections.abc import Iterable, Sequence

import xxhash

MAGIC = b"SCTRACE\0"
VERSION = 1
MAX_FILE_BYTES = 16 << 20  # bounded: a trace can never fill the store
MAX_BOOTS_PER_FILE = 8  # a host keeps its most recent boots
RECENT_BOOTS = 16  # boots considered when merging, across hosts
SUFFIX = ".trace"

_HEADER = struct.Struct("<8sHHIQQQ64sII")
_BOOT = struct.Struct("<QIIQI")
_ENTRY = struct.Struct("<QIQ")
_TRAILER = struct.Struct("<Q")
MAX_ENTRIES = (MAX_FILE_BYTES - _HEADER.size - _TRAILER.size
               - MAX_BOOTS_PER_FILE * _BOOT.size) // _ENTRY.size


class TraceError(ValueError):
    """A trace file that is corrupt, truncated, of another version or too big."""


@dataclasses.dataclass(frozen=True)
class LayerId:
    """What a trace file says about the layer it was recorded on."""

    ino: int
    size: int
    mtime_ns: int


@dataclasses.dataclass
class Boot:
    """One recorded boot: the chunks it read, first access time and digest of each."""

    started: int  # unix seconds
    duration_ms: int
    requests: int
    bytes: int
    chunks: list[tuple[int, int, int]]  # (chunk index, first access ms, xxh3_64 digest)


@dataclasses.dataclass
class TraceFile:
    """The boots of one host on one layer."""

    layer: LayerId
    chunk_size: int
    host: str
    boots: list[Boot]


def _cut(text: str, limit: int) -> bytes:
    """UTF-8 of text, at most ``limit`` bytes, never cutting a character in two."""
    return text.encode()[:limit].decode("utf-8", "ignore").encode()


def file_name(ino: int, host: str) -> bytes:
    """The trace file of a layer for one host (host names are sanitized, <= 64 bytes)."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in host)
    return f"ino-{ino}.{safe[:64] or 'host'}{SUFFIX}".encode()


def encode(trace: TraceFile) -> bytes:
    """Serialize; raises TraceError if the result would exceed the bounds."""
    boots = trace.boots[-MAX_BOOTS_PER_FILE:]
    total = sum(len(b.chunks) for b in boots)
    if total > MAX_ENTRIES:
        raise TraceError(f"trace too large: {total} entries (limit {MAX_ENTRIES})")
    cs = trace.chunk_size
    if cs < 4096 or cs > (1 << 20) or cs & (cs - 1):
        raise TraceError(f"bad chunk size {cs}")
    try:
        parts = [_HEADER.pack(MAGIC, VERSION, 0, cs, trace.layer.ino, trace.layer.size,
                              trace.layer.mtime_ns, _cut(trace.host, 64), len(boots), total)]
        for boot in boots:
            parts.append(_BOOT.pack(boot.started, boot.duration_ms, boot.requests, boot.bytes,
                                    len(boot.chunks)))
        for boot in boots:
            parts.extend(_ENTRY.pack(*entry) for entry in boot.chunks)
    except struct.error as exc:
        raise TraceError(f"a field is out of range: {exc}") from None
    body = b"".join(parts)
    return body + _TRAILER.pack(xxhash.xxh3_64_intdigest(body))


def decode(data: bytes, expect_ino: int | None = None) -> TraceFile:
    """Parse and validate a trace file; TraceError says exactly what is wrong."""
    if len(data) > MAX_FILE_BYTES:
        raise TraceError(f"oversized: {len(data)} bytes (limit {MAX_FILE_BYTES})")
    if len(data) < _HEADER.size + _TRAILER.size:
        raise TraceError(f"truncated: {len(data)} bytes is shorter than a header")
    (magic, version, _, chunk_size, ino, size, mtime_ns, host, nboots,
     nentries) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise TraceError("not a scachefs trace (bad magic)")
    if version != VERSION:
        raise TraceError(f"trace version {version} is not supported (this is {VERSION})")
    if chunk_size < 4096 or chunk_size > (1 << 20) or chunk_size & (chunk_size - 1):
        raise TraceError(f"bad chunk size {chunk_size}")
    if nboots > MAX_BOOTS_PER_FILE or nentries > MAX_ENTRIES:
        raise TraceError(f"declared counts too large: {nboots} boots, {nentries} entries")
    expected = _HEADER.size + nboots * _BOOT.size + nentries * _ENTRY.size + _TRAILER.size
    if len(data) != expected:
        raise TraceError(f"truncated or padded: {len(data)} bytes, header says {expected}")
    (checksum,) = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if xxhash.xxh3_64_intdigest(data[:-_TRAILER.size]) != checksum:
        raise TraceError("checksum mismatch (corrupt file)")
    if expect_ino is not None and ino != expect_ino:
        raise TraceError(f"trace of another layer (inode {ino}, expected {expect_ino})")
    try:
        host_name = host.rstrip(b"\0").decode()
    except UnicodeDecodeError:
        raise TraceError("host name is not UTF-8") from None
    boots: list[Boot] = []
    offset = _HEADER.size
    entry_offset = _HEADER.size + nboots * _BOOT.size
    for _ in range(nboots):
        started, duration_ms, requests, nbytes, count = _BOOT.unpack_from(data, offset)
        offset += _BOOT.size
        if count > nentries:
            raise TraceError(f"boot declares {count} entries, file has {nentries}")
        chunks = []
        for _ in range(count):
            if entry_offset + _ENTRY.size > len(data) - _TRAILER.size:
                raise TraceError("boots declare more entries than the file holds")
            chunk, first_ms, digest = _ENTRY.unpack_from(data, entry_offset)
            entry_offset += _ENTRY.size
            if chunk * chunk_size >= size:
                raise TraceError(f"chunk {chunk} is past the end of the layer ({size} bytes)")
            chunks.append((chunk, first_ms, digest))
        boots.append(Boot(started, duration_ms, requests, nbytes, chunks))
    if entry_offset != len(data) - _TRAILER.size:
        raise TraceError("boots declare fewer entries than the file holds")
    return TraceFile(LayerId(ino, size, mtime_ns), chunk_size, host_name, boots)


@dataclasses.dataclass
class WorkingSet:
    """The merged prediction of what the next boot reads, in first-access order."""

    chunk_size: int
    chunks: list[int]  # chunk indices, earliest first access first
    digests: dict[int, int]  # chunk index -> digest the most recent boot saw
    boots: int  # boots merged
    hosts: int
    current: bool  # True if some trace was recorded on the layer as it is now

    @property
    def bytes(self) -> int:
        return len(self.chunks) * self.chunk_size


def min_boots_for(boots: int) -> int:
    """How many of the recent boots must have read a chunk for it to stay in the set.

    Until 4 boots exist every chunk counts; from then on a chunk must have been
    read by at least a quarter of the recent boots, which drops one-off reads
    (a fsck that ran once, a rare service) without losing the common core.
    """
    return 1 if boots < 4 else math.ceil(boots / 4)


def merge(files: Iterable[TraceFile], layer: LayerId, chunk_size: int) -> WorkingSet | None:
    """Union of the most recent boots of every host, ordered by earliest first access."""
    dated: list[tuple[int, Boot, str]] = []
    current = False
    for trace in files:
        if trace.chunk_size != chunk_size:
            continue
        current = current or (trace.layer == layer and bool(trace.boots))
        dated.extend((boot.started, boot, trace.host) for boot in trace.boots)
    if not dated:
        return None
    dated.sort(key=lambda item: item[0], reverse=True)
    recent = dated[:RECENT_BOOTS]
    seen: dict[int, int] = {}
    first: dict[int, int] = {}
    digests: dict[int, int] = {}
    for _, boot, _ in reversed(recent):  # oldest first, so newer digests win
        for chunk, first_ms, digest in boot.chunks:
            seen[chunk] = seen.get(chunk, 0) + 1
            first[chunk] = min(first_ms, first.get(chunk, first_ms))
            digests[chunk] = digest
    need = min_boots_for(len(recent))
    chunks = sorted((c for c, n in seen.items() if n >= need), key=lambda c: (first[c], c))
    return WorkingSet(chunk_size, chunks, {c: digests[c] for c in chunks}, len(recent),
                      len({host for _, _, host in recent}), current)


def plan_runs(chunks: Sequence[int], chunk_size: int, layer_size: int,
              max_bytes: int = 1 << 20, max_gap: int = 2) -> list[tuple[int, int, list[int]]]:
    """Store reads for a working set: (offset, length, chunks), in first-access order.

    Chunks are grouped into runs of contiguous chunks of at most ``max_bytes``;
    a gap of up to ``max_gap`` chunks is read too when that saves a request.
    Runs are ordered by the earliest first access of their chunks.
    """
    if not chunks:
        return []
    rank = {c: i for i, c in enumerate(chunks)}
    per_run = max(1, max_bytes // chunk_size)
    runs: list[list[int]] = []
    for chunk in sorted(rank):
        if runs and chunk - runs[-1][-1] <= max_gap + 1 and chunk - runs[-1][0] < per_run:
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    runs.sort(key=lambda run: min(rank[c] for c in run))
    out = []
    for run in runs:
        offset = run[0] * chunk_size
        end = min((run[-1] + 1) * chunk_size, layer_size)
        if end > offset:
            out.append((offset, end - offset, run))
    return out


class TraceStore:
    """The trace directory: load every host's traces of a layer, save this host's (blocking)."""

    def __init__(self, dir_fd: int, host: str) -> None:
        self.dir_fd = dir_fd
        self.host = host

    def load(self, ino: int) -> tuple[list[TraceFile], list[tuple[str, str]]]:
        """All valid trace files of a layer, and (file, reason) for the rejected ones."""
        prefix = f"ino-{ino}.".encode()
        good: list[TraceFile] = []
        bad: list[tuple[str, str]] = []
        for name in os.listdir(self.dir_fd):
            raw = os.fsencode(name)
            if not raw.startswith(prefix) or not raw.endswith(SUFFIX.encode()):
                continue
            try:
                fd = os.open(raw, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                             dir_fd=self.dir_fd)
            except OSError as exc:
                bad.append((os.fsdecode(raw), exc.strerror or str(exc)))
                continue
            try:
                st = os.fstat(fd)
                if not (st.st_mode & 0o170000 == 0o100000):
                    bad.append((os.fsdecode(raw), "not a regular file"))
                    continue
                if st.st_size > MAX_FILE_BYTES:
                    bad.append((os.fsdecode(raw), f"oversized: {st.st_size} bytes"))
                    continue
                data = os.pread(fd, MAX_FILE_BYTES + 1, 0)
            except OSError as exc:  # unreadable: ignored like a corrupt one
                bad.append((os.fsdecode(raw), f"cannot read it: {exc.strerror or exc}"))
                continue
            finally:
                os.close(fd)
            try:
                good.append(decode(data, expect_ino=ino))
            except TraceError as exc:
                bad.append((os.fsdecode(raw), str(exc)))
        return good, bad

    def save(self, trace: TraceFile) -> str:
        """Write this host's trace file atomically (temp file, fsync, rename, fsync dir)."""
        data = encode(trace)
        name = file_name(trace.layer.ino, self.host)
        tmp = b"." + name + f".{os.getpid()}.tmp".encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=self.dir_fd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self.dir_fd)
            except OSError:
                pass
            raise
        os.fsync(self.dir_fd)
        return os.fsdecode(name)
