"""Probe an image file's header: is it qcow2, and which backing file does it name?

scachefs builds the graph of backing layers in an image store from these probes, so
the parser must read the backing references exactly as qemu does and must never
trust the file: every offset and length it uses is validated first, the
amount of data read is bounded (everything we look at lies in the first cluster,
at most 2 MiB), and the only exception a malformed file can cause is
:class:`ImageFormatError`.

The code does no I/O of its own: the caller passes a ``pread(offset, length)``
callable, so it works the same over a local file, a cache, or test bytes.

Layout reference: qemu ``docs/interop/qcow2.txt``; behaviour where the spec is
silent follows qemu 7.2's ``qcow2_do_open`` / ``qcow2_read_extensions``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["HEADER_PROBE_SIZE", "ImageFormatError", "ImageInfo", "read_image_info"]

#: How many bytes callers should read first; the header and, for the common
#: 64 KiB-cluster images, the extensions and backing name lie well inside it.
HEADER_PROBE_SIZE: int = 4096

_MAGIC = b"QFI\xfb"
_V2_HEADER_LENGTH = 72  # fixed for version 2
_V3_MIN_HEADER_LENGTH = 104  # version 3 header up to and including header_length
_MIN_CLUSTER_BITS = 9  # spec: 512-byte clusters at least
_MAX_CLUSTER_BITS = 21  # qemu implementation limit: 2 MiB clusters
_MAX_BACKING_NAME = 1023  # spec: backing_file_size must not exceed 1023
_MAX_BACKING_FORMAT = 15  # qemu keeps the format in char[16], longer is an error
_INT64_LIMIT = 1 << 63  # u64 fields at or above this look negative to qemu's int64 code
_READ_CHUNK = 64 * 1024  # grow the buffer in chunks, not 8 bytes per extension

_EXT_END = 0x00000000
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_DATA_FILE = 0x44415441
_EXT_NAMES = {_EXT_BACKING_FORMAT: "backing format", _EXT_DATA_FILE: "external data file"}

# magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
# crypt_method, l1_size, l1_table_offset, refcount_table_offset,
# refcount_table_clusters, nb_snapshots, snapshots_offset
_V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")
# incompatible_features, compatible_features, autoclear_features,
# refcount_order, header_length
_V3_FIELDS = struct.Struct(">QQQII")
_EXT_HEADER = struct.Struct(">II")
_U32 = struct.Struct(">I")

assert _V2_HEADER.size == _V2_HEADER_LENGTH
assert _V2_HEADER.size + _V3_FIELDS.size == _V3_MIN_HEADER_LENGTH


class ImageFormatError(ValueError):
    """A file that claims to be qcow2 (has the magic) but whose header is malformed.

    The message says precisely what is wrong (field name, value, limit), because it
    ends up in logs that an operator reads to fix the image store.
    """


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What scachefs needs to know about one image file to place it in the layer graph."""

    format: str  # "qcow2" or "raw"
    virtual_size: int  # qcow2: header size field; raw: file size
    cluster_size: int | None  # qcow2 only
    version: int | None  # 2 or 3 for qcow2
    backing_file: bytes | None  # exactly the stored bytes; None if no backing
    backing_format: str | None  # from header extension 0xe2792aca, if present
    data_file: bytes | None  # external data file extension 0x44415441, if present


class _Reader:
    """A growing prefix of the file, fetched through ``pread`` on demand.

    Keeps the total number of bytes requested bounded (``cap``) and turns short
    reads into a smaller known file size, so they surface as "truncated" errors.
    """

    __slots__ = ("_pread", "buf", "cap", "size")

    def __init__(self, pread: Callable[[int, int], bytes], file_size: int) -> None:
        self._pread = pread
        self.size = file_size  # shrinks if pread reports EOF earlier
        self.cap = min(file_size, HEADER_PROBE_SIZE)  # never fetch beyond this
        self.buf = b""

    def fetch(self, end: int) -> None:
        """Read more so that ``buf`` covers ``[0, end)`` if the file has it.

        Reads ahead up to ``cap`` in chunks; after a short read ``size`` is lowered to
        what the file actually holds. Callers check ``end <= size`` themselves.
        """
        start = len(self.buf)
        if end <= start or start >= self.size:
            return
        # start < size and start < end, so want > 0.
        want = min(self.size, max(end, min(self.cap, start + _READ_CHUNK))) - start
        data = bytes(self._pread(start, want)[:want])
        self.buf += data
        if len(data) < want:
            # The file ended early (it shrank, or the caller's size was stale):
            # treat it as truncated at what we actually got.
            self.size = len(self.buf)

    def require(self, end: int, what: str) -> None:
        """Make sure ``buf`` covers ``[0, end)``, else raise naming ``what`` needed it."""
        if end > self.size:
            raise ImageFormatError(
                f"{what} needs the file to extend to offset {end}, but the file ends at {self.size}"
            )
        self.fetch(end)
        if end > len(self.buf):
            raise ImageFormatError(
                f"{what} needs the file to extend to offset {end}, "
                f"but reading it stopped at {len(self.buf)} (file truncated)"
            )


def _check_int64(name: str, value: int) -> None:
    """Reject u64 fields that qemu would see as negative int64 (and are absurd anyway)."""
    if value >= _INT64_LIMIT:
        raise ImageFormatError(
            f"qcow2 header field {name} = {value:#x} is >= 2**63 (negative as int64)"
        )


def _reject_nul(data: bytes, ext_type: int, offset: int) -> None:
    """Reject NUL bytes in a string extension: qemu would silently cut the string there."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise ImageFormatError(
            f"{_EXT_NAMES[ext_type]} header extension {ext_type:#010x} at offset {offset} "
            f"contains a NUL byte at position {nul} of its {len(data)}-byte string"
        )


def read_image_info(pread: Callable[[int, int], bytes], file_size: int) -> ImageInfo:
    """Classify an image as raw or qcow2 and, for qcow2, return its backing references.

    ``pread(offset, length)`` returns up to ``length`` bytes at ``offset`` (short at
    EOF; a short read is treated as the file ending there). Reads the first
    ``HEADER_PROBE_SIZE`` bytes (or fewer), then whatever else it needs (header
    extensions area, backing file name) with further ``pread`` calls. Never reads
    past ``file_size``; everything it reads lies in the first cluster or the first
    probe, so the total is at most 2 MiB.

    Raises :class:`ImageFormatError` for a file with the qcow2 magic but a malformed
    header; exceptions raised by ``pread`` itself (I/O errors) propagate unchanged.
    ``file_size`` must not be negative (``ValueError``: a caller bug, not a bad image).
    """
    if file_size < 0:
        raise ValueError(f"file_size must be >= 0, got {file_size}")
    raw = ImageInfo("raw", file_size, None, None, None, None, None)
    if file_size < len(_MAGIC):
        return raw
    reader = _Reader(pread, file_size)
    reader.fetch(reader.cap)
    if reader.buf[: len(_MAGIC)] != _MAGIC:
        return raw
    return _parse_qcow2(reader)


def _parse_qcow2(reader: _Reader) -> ImageInfo:
    """Validate the qcow2 header held (or fetchable) by ``reader`` and extract the fields."""
    reader.require(8, "qcow2 version field")
    (version,) = _U32.unpack_from(reader.buf, 4)
    if version not in (2, 3):
        raise ImageFormatError(f"qcow2 header field version = {version}: only 2 and 3 exist")

    fixed_length = _V2_HEADER_LENGTH if version == 2 else _V3_MIN_HEADER_LENGTH
    reader.require(fixed_length, f"qcow2 version {version} header ({fixed_length} bytes)")
    (
        _magic,
        _version,
        backing_offset,
        backing_size,
        cluster_bits,
        virtual_size,
        _crypt_method,
        _l1_size,
        l1_table_offset,
        refcount_table_offset,
        _refcount_table_clusters,
        _nb_snapshots,
        snapshots_offset,
    ) = _V2_HEADER.unpack_from(reader.buf, 0)

    _check_int64("size", virtual_size)
    _check_int64("backing_file_offset", backing_offset)
    _check_int64("l1_table_offset", l1_table_offset)
    _check_int64("refcount_table_offset", refcount_table_offset)
    _check_int64("snapshots_offset", snapshots_offset)

    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise ImageFormatError(
            f"qcow2 header field cluster_bits = {cluster_bits} is outside "
            f"{_MIN_CLUSTER_BITS}..{_MAX_CLUSTER_BITS} (512 B to 2 MiB clusters)"
        )
    cluster_size = 1 << cluster_bits
    # Everything else we need lies in the first cluster: allow reading up to it.
    reader.cap = min(reader.size, max(HEADER_PROBE_SIZE, cluster_size))

    if version == 2:
        header_length = _V2_HEADER_LENGTH
    else:
        *_features, _refcount_order, header_length = _V3_FIELDS.unpack_from(
            reader.buf, _V2_HEADER_LENGTH
        )
        if header_length < _V3_MIN_HEADER_LENGTH:
            raise ImageFormatError(
                f"qcow2 header field header_length = {header_length} is below the "
                f"version 3 minimum of {_V3_MIN_HEADER_LENGTH}"
            )
        if header_length % 8:
            raise ImageFormatError(
                f"qcow2 header field header_length = {header_length} is not a multiple of 8"
            )
        if header_length > cluster_size:
            raise ImageFormatError(
                f"qcow2 header field header_length = {header_length} exceeds the "
                f"cluster size {cluster_size}"
            )
        reader.require(header_length, f"qcow2 header (header_length = {header_length})")

    # Backing file reference. The spec calls backing_file_size "undefined" when
    # backing_file_offset is 0, so the size is only looked at with a nonzero offset.
    if backing_offset != 0:
        if backing_size > _MAX_BACKING_NAME:
            raise ImageFormatError(
                f"qcow2 header field backing_file_size = {backing_size} exceeds the "
                f"limit of {_MAX_BACKING_NAME} bytes"
            )
        # qemu ("Invalid backing file offset") requires the name in the first cluster.
        if backing_offset > cluster_size:
            raise ImageFormatError(
                f"qcow2 header field backing_file_offset = {backing_offset} lies beyond "
                f"the first cluster (cluster size {cluster_size})"
            )
        # Extensions end where the backing name starts (qemu uses the same ext_end).
        ext_end = backing_offset
        ext_end_what = f"backing_file_offset {backing_offset}"
    else:
        ext_end = cluster_size
        ext_end_what = f"end of the first cluster at {cluster_size}"

    # backing_file_offset != 0 with backing_file_size == 0 means "no backing file":
    # qemu reads a 0-byte name, i.e. the empty string, and the block layer treats an
    # empty backing_file as none (qemu-img info then shows no backing file at all).
    # The offset still bounds the extension area, exactly as in qemu.
    has_backing = backing_offset != 0 and backing_size != 0
    if has_backing:
        backing_end = backing_offset + backing_size
        if backing_offset < header_length:
            raise ImageFormatError(
                f"qcow2 backing file name (backing_file_offset = {backing_offset}, "
                f"backing_file_size = {backing_size}) overlaps the {header_length}-byte header"
            )
        if backing_end > reader.size:
            raise ImageFormatError(
                f"qcow2 backing file name (backing_file_offset = {backing_offset}, "
                f"backing_file_size = {backing_size}) ends at {backing_end}, past the end "
                f"of the file at {reader.size}"
            )
        if backing_end > cluster_size:
            raise ImageFormatError(
                f"qcow2 backing file name (backing_file_offset = {backing_offset}, "
                f"backing_file_size = {backing_size}) ends at {backing_end}, past the end "
                f"of the first cluster at {cluster_size}"
            )

    backing_format, data_file = _parse_extensions(reader, header_length, ext_end, ext_end_what)

    backing_file: bytes | None = None
    if has_backing:
        reader.require(backing_offset + backing_size, "qcow2 backing file name")
        backing_file = reader.buf[backing_offset : backing_offset + backing_size]
        nul = backing_file.find(b"\0")
        if nul >= 0:
            raise ImageFormatError(
                f"qcow2 backing file name (backing_file_offset = {backing_offset}, "
                f"backing_file_size = {backing_size}) contains a NUL byte at position {nul}"
            )

    return ImageInfo(
        format="qcow2",
        virtual_size=virtual_size,
        cluster_size=cluster_size,
        version=version,
        backing_file=backing_file,
        backing_format=backing_format,
        data_file=data_file,
    )


def _parse_extensions(
    reader: _Reader, start: int, ext_end: int, ext_end_what: str
) -> tuple[str | None, bytes | None]:
    """Walk the header extensions in ``[start, ext_end)``; return (backing format, data file).

    ``ext_end`` is at most the cluster size and every step advances by at least 8
    bytes, so the loop is bounded by the first cluster. As in qemu, running into
    ``ext_end`` without an end marker simply ends the list.
    """
    backing_format: str | None = None
    data_file: bytes | None = None
    seen: set[int] = set()
    offset = start
    while offset < ext_end:
        if offset + _EXT_HEADER.size > ext_end:
            raise ImageFormatError(
                f"qcow2 header extension at offset {offset}: its 8-byte type/length "
                f"does not fit before the end of the extension area ({ext_end_what})"
            )
        reader.require(offset + _EXT_HEADER.size, f"qcow2 header extension at offset {offset}")
        ext_type, length = _EXT_HEADER.unpack_from(reader.buf, offset)
        data_offset = offset + _EXT_HEADER.size
        if length > ext_end - data_offset:
            raise ImageFormatError(
                f"qcow2 header extension {ext_type:#010x} at offset {offset}: length "
                f"{length} runs past the end of the extension area ({ext_end_what})"
            )
        if ext_type == _EXT_END:
            break
        data_end = data_offset + length
        if data_end > reader.size:
            raise ImageFormatError(
                f"qcow2 header extension {ext_type:#010x} at offset {offset}: length "
                f"{length} runs past the end of the file at {reader.size}"
            )
        if ext_type in _EXT_NAMES:
            if ext_type in seen:
                # The spec allows each extension at most once; qemu would silently
                # take the last one, which makes the layer graph ambiguous.
                raise ImageFormatError(
                    f"qcow2 {_EXT_NAMES[ext_type]} header extension {ext_type:#010x} "
                    f"appears twice (again at offset {offset})"
                )
            seen.add(ext_type)
            reader.require(data_end, f"qcow2 header extension {ext_type:#010x}")
            data = reader.buf[data_offset:data_end]
            if ext_type == _EXT_BACKING_FORMAT:
                backing_format = _backing_format(data, offset)
            else:
                _reject_nul(data, ext_type, offset)
                # An empty data file name names nothing: report it as absent.
                data_file = data or None
        offset = data_offset + ((length + 7) & ~7)
    return backing_format, data_file


def _backing_format(data: bytes, offset: int) -> str | None:
    """Decode the backing format name; empty means "not set" (as qemu treats it)."""
    if len(data) > _MAX_BACKING_FORMAT:
        raise ImageFormatError(
            f"qcow2 backing format header extension at offset {offset}: length "
            f"{len(data)} exceeds qemu's limit of {_MAX_BACKING_FORMAT} bytes"
        )
    _reject_nul(data, _EXT_BACKING_FORMAT, offset)
    try:
        name = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ImageFormatError(
            f"qcow2 backing format header extension at offset {offset}: byte "
            f"{data[exc.start]:#04x} at position {exc.start} is not ASCII"
        ) from None
    return name or None
