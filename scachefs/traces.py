"""Boot traces: what boots read from a layer, stored safely in the store, merged into a working set.

A trace file holds the recent boots one host recorded for one layer. Files live
in the trace directory (``SOURCE/.scache/traces`` by default), named
``fp-<layer fingerprint>.<host>.trace``: hosts never write the same file and
every host that mounts the store reads them all. The **fingerprint** is an
xxh3-128 of the layer's size and a few sampled pieces of its content (the first
64 KiB, a qcow2 layer's L1 table, eight 4 KiB blocks spread over the file), so
every host computes the same key for the same bytes, whatever path, inode
number, mtime granularity or network file system it sees them through, and a
layer keeps its traces across renames, hard links and copies. Each entry
carries the xxh3 digest of the chunk it saw, so a trace of a layer whose bytes
changed where the fingerprint does not look is still caught chunk by chunk at
prefetch. Files of format 1 (``ino-<inode>.<host>.trace``, keyed by the store's
inode number) are read and migrated to format 2 once, by the first host that
attaches the layer with that inode number and size.

File format, version 2, little-endian::

    header   magic "SCTRACE\\0", version u16, reserved u16, chunk_size u32,
             layer fingerprint 16 bytes, layer size u64, layer mtime_ns i64 (when
             recorded, as the recording host saw it), host 64 bytes (UTF-8, NUL
             padded), layer path 256 bytes (relative to the store when recorded,
             UTF-8, NUL padded; a hint for tools), boots u32, entries u32
    boots    boots x (started unix seconds u64, duration_ms u32, requests u32,
             bytes u64, entries u32)
    entries  entries x (chunk index u64, first access ms u32, xxh3_64 digest u64)
    trailer  xxh3_64 of everything before it, u64

Version 1 had ``layer ino u64`` in place of the fingerprint and no path.

Readers reject anything malformed with :class:`TraceError` (never another
exception), so a corrupt file is logged and ignored, never trusted.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import re
import struct
from collections.abc import Iterable, Sequence

import xxhash

log = logging.getLogger(__name__)

MAGIC = b"SCTRACE\0"
VERSION = 2
LEGACY_VERSION = 1  # keyed by inode number: read, and migrated once
MAX_FILE_BYTES = 16 << 20  # bounded: a trace can never fill the store
MAX_BOOTS_PER_FILE = 8  # a host keeps its most recent boots
RECENT_BOOTS = 16  # boots considered when merging, across hosts
SUFFIX = ".trace"
PATH_BYTES = 256

_HEADER = struct.Struct("<8sHHI16sQq64s256sII")  # mtime_ns signed: pre-1970 layers
_HEADER_V1 = struct.Struct("<8sHHIQQq64sII")
_BOOT = struct.Struct("<QIIQI")
_ENTRY = struct.Struct("<QIQ")
_TRAILER = struct.Struct("<Q")
MAX_ENTRIES = (MAX_FILE_BYTES - _HEADER.size - _TRAILER.size
               - MAX_BOOTS_PER_FILE * _BOOT.size) // _ENTRY.size

# What the fingerprint reads: the head of the file, a qcow2 L1 table, sampled blocks.
FP_HEAD = 64 << 10
FP_L1_MAX = 64 << 10
FP_SAMPLES = 8
FP_BLOCK = 4 << 10
FP_WHOLE = 1 << 20  # files up to this size are hashed whole
FP_NAME = re.compile(rb"^fp-([0-9a-f]{32})\.")
INO_NAME = re.compile(rb"^ino-([0-9]+)\.")


class TraceError(ValueError):
    """A trace file that is corrupt, truncated, of another version or too big."""


@dataclasses.dataclass(frozen=True)
class LayerId:
    """A layer as every host sees it: content fingerprint, size, mtime when recorded.

    ``ino`` is only set for format-1 files (the recording host's inode number,
    which other hosts may number differently); their fingerprint is empty.
    """

    fingerprint: bytes
    size: int
    mtime_ns: int
    ino: int = 0

    @property
    def hex(self) -> str:
        return self.fingerprint.hex()

    def same_version(self, other: LayerId) -> bool:
        """Same bytes as far as every host can tell: fingerprint, size and mtime.

        mtimes are compared to the nanosecond when both have a fraction of a second,
        else in whole seconds: sshfs (SFTP) reports only seconds, NFS, GlusterFS,
        CephFS and local file systems nanoseconds of the same value.
        """
        if not self.fingerprint or self.fingerprint != other.fingerprint \
                or self.size != other.size:
            return False
        a, b = self.mtime_ns, other.mtime_ns
        if a % 1_000_000_000 and b % 1_000_000_000:
            return a == b
        return a // 1_000_000_000 == b // 1_000_000_000


@dataclasses.dataclass
class Boot:
    """One recorded boot: the chunks it read, first access time and digest of each."""

    started: int  # unix seconds
    duration_ms: int
    requests: int
    bytes: int
    chunks: list[tuple[int, int, int]]  # (chunk index, first access ms, xxh3_64 digest)


def boot_key(boot: Boot, chunk_size: int) -> tuple[object, ...]:
    """What makes two boots the same boot (an import of a boot the store already has)."""
    return (chunk_size, boot.started, boot.duration_ms, boot.requests, boot.bytes,
            tuple(chunk for chunk, _, _ in boot.chunks))


@dataclasses.dataclass
class TraceFile:
    """The boots of one host on one layer."""

    layer: LayerId
    chunk_size: int
    host: str
    boots: list[Boot]
    path: str = ""  # the layer's path in the store when recorded (a hint for tools)
    version: int = VERSION


def _read(fd: int, size: int, offset: int) -> bytes:
    """pread until ``size`` bytes or end of file (blocking)."""
    parts = []
    while size > 0:
        data = os.pread(fd, size, offset)
        if not data:
            break
        parts.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(parts)


def fingerprint(fd: int, size: int) -> bytes:
    """The layer's content fingerprint (16 bytes); blocking: call it in a worker thread.

    xxh3-128 of the size and: the whole file up to 1 MiB; else its first 64 KiB
    (a qcow2 header, its extensions and backing name), a qcow2 layer's L1 table
    (up to 64 KiB: it changes when the image grows into new regions) and eight
    4 KiB blocks spread evenly up to the last one. About 100-170 KiB in at most
    ten reads, once per attach of a layer.
    """
    h = xxhash.xxh3_128()
    h.update(struct.pack("<Q", size))
    if size <= FP_WHOLE:
        h.update(_read(fd, size, 0))
        return h.digest()
    head = _read(fd, FP_HEAD, 0)
    h.update(head)
    if head[:4] == b"QFI\xfb" and len(head) >= 48:
        l1_size, l1_offset = struct.unpack_from(">IQ", head, 36)
        length = min(l1_size * 8, FP_L1_MAX)
        if length and 0 < l1_offset < size:
            h.update(_read(fd, length, l1_offset))
    for k in range(1, FP_SAMPLES + 1):
        offset = (size - FP_BLOCK) * k // FP_SAMPLES // FP_BLOCK * FP_BLOCK
        h.update(_read(fd, FP_BLOCK, offset))
    return h.digest()


def _cut(text: str, limit: int) -> bytes:
    """UTF-8 of text, at most ``limit`` bytes, never cutting a character in two."""
    return text.encode(errors="surrogateescape")[:limit].decode("utf-8", "ignore").encode()


def _safe_host(host: str) -> str:
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in host)
    return safe[:64] or "host"


def file_name(fp: bytes, host: str) -> bytes:
    """The trace file of a layer for one host (host names are sanitized, <= 64 bytes)."""
    if len(fp) != 16:
        raise TraceError(f"a layer fingerprint has 16 bytes, not {len(fp)}")
    return f"fp-{fp.hex()}.{_safe_host(host)}{SUFFIX}".encode()


def legacy_file_name(ino: int, host: str) -> bytes:
    """A format-1 file name (keyed by the recording host's inode number)."""
    return f"ino-{ino}.{_safe_host(host)}{SUFFIX}".encode()


def encode(trace: TraceFile) -> bytes:
    """Serialize (always format 2); raises TraceError if the result would exceed the bounds."""
    boots = trace.boots[-MAX_BOOTS_PER_FILE:]
    total = sum(len(b.chunks) for b in boots)
    if total > MAX_ENTRIES:
        raise TraceError(f"trace too large: {total} entries (limit {MAX_ENTRIES})")
    cs = trace.chunk_size
    if cs < 4096 or cs > (1 << 20) or cs & (cs - 1):
        raise TraceError(f"bad chunk size {cs}")
    if len(trace.layer.fingerprint) != 16:
        raise TraceError("the layer has no fingerprint")
    try:
        parts = [_HEADER.pack(MAGIC, VERSION, 0, cs, trace.layer.fingerprint,
                              trace.layer.size, trace.layer.mtime_ns, _cut(trace.host, 64),
                              _cut(trace.path, PATH_BYTES), len(boots), total)]
        for boot in boots:
            parts.append(_BOOT.pack(boot.started, boot.duration_ms, boot.requests, boot.bytes,
                                    len(boot.chunks)))
        for boot in boots:
            parts.extend(_ENTRY.pack(*entry) for entry in boot.chunks)
    except struct.error as exc:
        raise TraceError(f"a field is out of range: {exc}") from None
    body = b"".join(parts)
    return body + _TRAILER.pack(xxhash.xxh3_64_intdigest(body))


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.rstrip(b"\0").decode()
    except UnicodeDecodeError:
        raise TraceError(f"{what} is not UTF-8") from None


def decode(data: bytes, *, fingerprint: bytes | None = None,
           ino: int | None = None) -> TraceFile:
    """Parse and validate a trace file (format 2 or 1); TraceError says exactly what is wrong.

    ``fingerprint`` (format 2) or ``ino`` (format 1) is the layer the caller
    expects: a file of another layer is rejected.
    """
    if len(data) > MAX_FILE_BYTES:
        raise TraceError(f"oversized: {len(data)} bytes (limit {MAX_FILE_BYTES})")
    if len(data) < 12 + _TRAILER.size:
        raise TraceError(f"truncated: {len(data)} bytes is shorter than a header")
    magic, version = struct.unpack_from("<8sH", data)
    if magic != MAGIC:
        raise TraceError("not a scachefs trace (bad magic)")
    if version not in (VERSION, LEGACY_VERSION):
        raise TraceError(f"trace version {version} is not supported (this is {VERSION})")
    header = _HEADER if version == VERSION else _HEADER_V1
    if len(data) < header.size + _TRAILER.size:
        raise TraceError(f"truncated: {len(data)} bytes is shorter than a header")
    path = ""
    if version == VERSION:
        (_, _, _, chunk_size, fp, size, mtime_ns, host, raw_path, nboots,
         nentries) = _HEADER.unpack_from(data)
        layer_ino = 0
    else:
        (_, _, _, chunk_size, layer_ino, size, mtime_ns, host, nboots,
         nentries) = _HEADER_V1.unpack_from(data)
        fp, raw_path = b"", b""
    if chunk_size < 4096 or chunk_size > (1 << 20) or chunk_size & (chunk_size - 1):
        raise TraceError(f"bad chunk size {chunk_size}")
    if nboots > MAX_BOOTS_PER_FILE or nentries > MAX_ENTRIES:
        raise TraceError(f"declared counts too large: {nboots} boots, {nentries} entries")
    expected = header.size + nboots * _BOOT.size + nentries * _ENTRY.size + _TRAILER.size
    if len(data) != expected:
        raise TraceError(f"truncated or padded: {len(data)} bytes, header says {expected}")
    (checksum,) = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if xxhash.xxh3_64_intdigest(data[:-_TRAILER.size]) != checksum:
        raise TraceError("checksum mismatch (corrupt file)")
    if version == VERSION and fingerprint is not None and fp != fingerprint:
        raise TraceError(f"trace of another layer (fingerprint {fp.hex()}, expected "
                         f"{fingerprint.hex()})")
    if version == LEGACY_VERSION and ino is not None and layer_ino != ino:
        raise TraceError(f"trace of another layer (inode {layer_ino}, expected {ino})")
    if version == LEGACY_VERSION and fingerprint is not None and ino is None:
        raise TraceError("a format-1 trace (keyed by inode number) where a fingerprint "
                         "was expected")
    host_name = _text(host, "host name")
    path = _text(raw_path, "layer path")
    boots: list[Boot] = []
    offset = header.size
    entry_offset = header.size + nboots * _BOOT.size
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
    return TraceFile(LayerId(fp, size, mtime_ns, layer_ino), chunk_size, host_name, boots,
                     path, version)


Check = tuple[int, int, int]  # (offset, length, xxh3_64 digest) of a byte range of the layer


@dataclasses.dataclass
class WorkingSet:
    """The merged prediction of what the next boot reads, in first-access order.

    Its chunks are the mount's; boots recorded at another chunk size are converted
    (a trace is a set of byte ranges). Their digests cover the chunks they were
    recorded at, so they are checked as byte ranges: ``checks`` holds them under
    the last of the working set's chunks each range touches.
    """

    chunk_size: int
    chunks: list[int]  # chunk indices, earliest first access first
    digests: dict[int, int]  # chunk index -> digest the most recent boot saw
    boots: int  # boots merged
    hosts: int
    current: bool  # True if some trace was recorded on the layer as it is now, at chunk_size
    checks: dict[int, list[Check]] = dataclasses.field(default_factory=dict)
    converted: int = 0  # boots merged that were recorded at another chunk size
    chunk_sizes: list[int] = dataclasses.field(default_factory=list)  # recorded at
    same_version: bool = False  # merged from boots of the layer as it is now (any chunk size)

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


def regrid(boot: Boot, from_size: int, to_size: int,
           layer_size: int) -> list[tuple[int, int]]:
    """A boot's chunks at another chunk size: (chunk, first access ms), in first-access order.

    Each recorded chunk is the byte range it covers; every chunk of the new size
    that overlaps one is read by the boot, first when the earliest of them was.
    """
    first: dict[int, int] = {}
    for chunk, ms, _ in boot.chunks:
        start = chunk * from_size
        end = min(start + from_size, layer_size)
        for new in range(start // to_size, (max(end, start + 1) - 1) // to_size + 1):
            if ms < first.get(new, ms + 1):
                first[new] = ms
    return sorted(first.items(), key=lambda item: (item[1], item[0]))


def merge(files: Iterable[TraceFile], layer: LayerId, chunk_size: int) -> WorkingSet | None:
    """Union of the most recent boots of every host, ordered by earliest first access.

    When some host recorded on the layer as it is now (same fingerprint, size and
    mtime), only such boots are merged: boots of other versions predict other bytes.
    Otherwise every boot counts (the digests catch what changed, at prefetch).
    Boots recorded at another chunk size are converted to ``chunk_size``; the same
    boot in two files (an imported copy) counts once.
    """
    usable = [t for t in files if t.boots]
    now = [t for t in usable if t.layer.same_version(layer)]
    # Current: recorded on the layer as it is now, at this chunk size (a converted
    # trace predicts at its own, coarser or finer, grain: record=auto records once).
    current = any(t.chunk_size == chunk_size for t in now)
    dated: list[tuple[int, Boot, TraceFile]] = []
    known: set[tuple[object, ...]] = set()
    for trace in now or usable:
        for boot in trace.boots:
            key = boot_key(boot, trace.chunk_size)
            if key not in known:
                known.add(key)
                dated.append((boot.started, boot, trace))
    if not dated:
        return None
    dated.sort(key=lambda item: item[0], reverse=True)
    recent = dated[:RECENT_BOOTS]
    seen: dict[int, int] = {}
    first: dict[int, int] = {}
    digests: dict[int, int] = {}
    ranges: dict[tuple[int, int], Check] = {}  # (chunk size, chunk) -> range check
    for _, boot, trace in reversed(recent):  # oldest first, so newer digests win
        cs = trace.chunk_size
        if cs == chunk_size:
            for chunk, first_ms, digest in boot.chunks:
                seen[chunk] = seen.get(chunk, 0) + 1
                first[chunk] = min(first_ms, first.get(chunk, first_ms))
                digests[chunk] = digest
            continue
        for chunk, first_ms in regrid(boot, cs, chunk_size, trace.layer.size):
            seen[chunk] = seen.get(chunk, 0) + 1
            first[chunk] = min(first_ms, first.get(chunk, first_ms))
        for chunk, _, digest in boot.chunks:
            start = chunk * cs
            ranges[cs, chunk] = (start, min(start + cs, trace.layer.size) - start, digest)
    need = min_boots_for(len(recent))
    chunks = sorted((c for c, n in seen.items() if n >= need), key=lambda c: (first[c], c))
    wanted = set(chunks)
    checks: dict[int, list[Check]] = {}
    for offset, length, digest in ranges.values():
        covered = range(offset // chunk_size, (offset + length - 1) // chunk_size + 1)
        # Checked where every chunk it covers is prefetched and none has a digest of its own.
        if all(c in wanted and c not in digests for c in covered):
            checks.setdefault(covered[-1], []).append((offset, length, digest))
    return WorkingSet(chunk_size, chunks, {c: digests[c] for c in chunks if c in digests},
                      len(recent), len({trace.host for _, _, trace in recent}), current,
                      checks, sum(1 for _, _, trace in recent if trace.chunk_size != chunk_size),
                      sorted({trace.chunk_size for _, _, trace in recent}), bool(now))


PREFETCH_READ_BYTES = 1 << 20  # a prefetch read is at most this long (a FUSE request's size)
GAP_BYTES = 128 << 10  # a gap this small between wanted chunks is read to save a request


def prefetch_plan(chunks: Sequence[int], chunk_size: int, layer_size: int,
                  max_bytes: int = PREFETCH_READ_BYTES) -> list[tuple[int, int, list[int]]]:
    """The store reads a prefetch of these chunks makes: what ``scachefs-trace show`` predicts
    and what :func:`scachefs.prefetch.prefetch` reads are both this plan."""
    return plan_runs(chunks, chunk_size, layer_size, max_bytes=max_bytes,
                     max_gap=max(1, GAP_BYTES // chunk_size))


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

    def _read_file(self, raw: bytes) -> bytes:
        """A candidate trace file's bytes; OSError or TraceError says why it is unusable."""
        fd = os.open(raw, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=self.dir_fd)
        try:
            st = os.fstat(fd)
            if not (st.st_mode & 0o170000 == 0o100000):
                raise TraceError("not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise TraceError(f"oversized: {st.st_size} bytes")
            try:
                return os.pread(fd, MAX_FILE_BYTES + 1, 0)
            except OSError as exc:  # unreadable: ignored like a corrupt one
                raise TraceError(f"cannot read it: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def load(self, layer: LayerId, path: str = "",
             ino: int | None = None) -> tuple[list[TraceFile], list[tuple[str, str]]]:
        """All valid trace files of a layer, and (file, reason) for the rejected ones.

        With ``ino`` (the layer's inode number in this host's view of the store),
        format-1 files of that inode whose layer size matches are migrated first:
        rewritten as format 2 under the fingerprint (keeping their host, boots and
        recorded mtime) and removed.
        """
        prefix = f"fp-{layer.hex}.".encode()
        legacy = f"ino-{ino}.".encode() if ino is not None else None
        good: list[TraceFile] = []
        bad: list[tuple[str, str]] = []
        old: list[tuple[bytes, TraceFile]] = []
        names = [os.fsencode(n) for n in os.listdir(self.dir_fd)]
        for raw in names:
            if not raw.endswith(SUFFIX.encode()):
                continue
            is_legacy = legacy is not None and raw.startswith(legacy)
            if not raw.startswith(prefix) and not is_legacy:
                continue
            try:
                data = self._read_file(raw)
                if is_legacy:
                    trace = decode(data, ino=ino)
                    if trace.version != LEGACY_VERSION:
                        raise TraceError("a format-2 trace under a format-1 name")
                    if trace.layer.size == layer.size:
                        old.append((raw, trace))
                    continue  # another layer this host numbers alike, or an old version
                good.append(decode(data, fingerprint=layer.fingerprint))
            except OSError as exc:
                bad.append((os.fsdecode(raw), exc.strerror or str(exc)))
            except TraceError as exc:
                bad.append((os.fsdecode(raw), str(exc)))
        for raw, trace in old:
            good = self._migrate(raw, trace, layer, path, good)
        return good, bad

    def _migrate(self, raw: bytes, trace: TraceFile, layer: LayerId, path: str,
                 good: list[TraceFile]) -> list[TraceFile]:
        """Rewrite a format-1 file as format 2 (its boots join that host's file) and remove it."""
        same = [t for t in good if t.host == trace.host]
        boots = sorted([b for t in same for b in t.boots] + trace.boots,
                       key=lambda b: b.started)[-MAX_BOOTS_PER_FILE:]
        recorded = same[0].layer if same else LayerId(layer.fingerprint, trace.layer.size,
                                                      trace.layer.mtime_ns)
        new = TraceFile(recorded, trace.chunk_size, trace.host, boots,
                        same[0].path if same else path)
        try:
            name = self.save(new, host=trace.host)
            os.unlink(raw, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass  # another host migrated it at the same time: same result
        except (OSError, TraceError) as exc:
            log.warning("cannot migrate trace file %s to format %d: %s", os.fsdecode(raw),
                        VERSION, exc)
            return [*good, trace]
        log.info("migrated trace file %s (format 1, inode %d) to %s", os.fsdecode(raw),
                 trace.layer.ino, name)
        return [t for t in good if t.host != trace.host] + [new]

    def save(self, trace: TraceFile, host: str | None = None) -> str:
        """Write a host's trace file atomically (temp file, fsync, rename, fsync dir).

        The file is this host's unless ``host`` says otherwise (migration only).
        """
        data = encode(trace)
        owner = self.host if host is None else host
        name = file_name(trace.layer.fingerprint, owner)
        # The temporary name is this host's own: hosts never write the same file.
        tmp = b"." + name + f".{_safe_host(self.host)}.{os.getpid()}.tmp".encode()
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
        try:
            os.fsync(self.dir_fd)
        except OSError as exc:  # some network file systems cannot fsync a directory
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                raise
        return os.fsdecode(name)
