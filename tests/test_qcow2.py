"""Tests for scachefs.qcow2: real qemu-img images, a malformed-header corpus, and fuzzing."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scachefs.qcow2 import HEADER_PROBE_SIZE, ImageFormatError, ImageInfo, read_image_info
from tests.mounting import require_tool

# qemu-img writes the reference images: make setup installs it; without it every test
# here fails loudly (tests.mounting.require_tool), never skips.
require_tool("qemu-img")

# The brief's hard cap on bytes read per probe: the first cluster plus a name.
READ_CAP = 2 * 1024 * 1024 + 1023

# Header field offsets (docs/interop/qcow2.txt).
OFF_VERSION = 4
OFF_BACKING_OFFSET = 8
OFF_BACKING_SIZE = 16
OFF_CLUSTER_BITS = 20
OFF_SIZE = 24
OFF_L1_TABLE_OFFSET = 40
OFF_HEADER_LENGTH = 100
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441


# --------------------------------------------------------------------------- helpers


class pread_of:  # used like a function: pread_of(path)
    """A pread callable over an open file that records every request it serves."""

    def __init__(self, path: Path) -> None:
        self._file: BinaryIO = open(path, "rb")  # closed by close() / with
        self.calls: list[tuple[int, int]] = []

    def __call__(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        return os.pread(self._file.fileno(), length, offset)

    @property
    def total(self) -> int:
        return sum(length for _, length in self.calls)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> pread_of:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def probe(path: Path) -> ImageInfo:
    """read_image_info over a real file, checking the read bounds on the way."""
    size = path.stat().st_size
    with pread_of(path) as pread:
        try:
            return read_image_info(pread, size)
        finally:
            assert pread.total <= READ_CAP
            for offset, length in pread.calls:
                assert offset >= 0 and length > 0 and offset + length <= size


def qemu_img(*args: str | bytes | Path, cwd: Path | None = None) -> str:
    """Run qemu-img, failing the test with its stderr if it fails."""
    proc = subprocess.run(
        ["qemu-img", *[os.fsencode(a) for a in args]],
        cwd=cwd,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode(errors="replace")


def qemu_info(path: Path) -> dict[str, Any]:
    """`qemu-img info --output=json`, the reference every parsed image is compared with."""
    info: dict[str, Any] = json.loads(qemu_img("info", "--output=json", path))
    return info


def create(
    path: Path,
    size: str | None = "10M",
    *,
    backing: str | bytes | None = None,
    backing_fmt: str | None = None,
    opts: str | None = None,
    unsafe: bool = False,
) -> Path:
    """Create a qcow2 image with qemu-img in the image's own directory."""
    args: list[str | bytes | Path] = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing is not None:
        args += ["-b", backing]
        if backing_fmt is not None:
            args += ["-F", backing_fmt]
    if unsafe:
        args.append("-u")
    args.append(path.name)
    if size is not None:  # None: inherit the backing file's size
        args.append(size)
    qemu_img(*args, cwd=path.parent)
    return path


def assert_matches_qemu(info: ImageInfo, path: Path) -> dict[str, Any]:
    """Every field read_image_info returns agrees with qemu-img's view of the image."""
    ref = qemu_info(path)
    assert info.format == ref["format"]
    assert info.virtual_size == ref["virtual-size"]
    if info.format == "raw":
        assert info.cluster_size is None and info.version is None
        assert info.backing_file is None and info.backing_format is None
        assert info.data_file is None
        return ref
    assert info.cluster_size == ref["cluster-size"]
    data = ref["format-specific"]["data"]
    assert info.version == {"0.10": 2, "1.1": 3}[data["compat"]]
    if info.backing_file is None:
        assert "backing-filename" not in ref
    else:
        # qemu-img prints invalid UTF-8 as U+FFFD; compare the same way.
        assert ref["backing-filename"] == info.backing_file.decode("utf-8", errors="replace")
    assert info.backing_format == ref.get("backing-filename-format")
    if info.data_file is None:
        assert "data-file" not in data
    else:
        assert data["data-file"] == info.data_file.decode()
    return ref


def u32(path: Path, offset: int) -> int:
    value: int = struct.unpack_from(">I", path.read_bytes(), offset)[0]
    return value


def poke(path: Path, offset: int, fmt: str, *values: int | bytes) -> None:
    """Overwrite header bytes in place with struct.pack_into."""
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(bytes(data))


def find_extension(data: bytes, ext_type: int) -> int:
    """Offset of the given header extension, found by walking the list (test-side copy)."""
    version = struct.unpack_from(">I", data, 4)[0]
    offset = 72 if version == 2 else struct.unpack_from(">I", data, OFF_HEADER_LENGTH)[0]
    while True:
        typ, length = struct.unpack_from(">II", data, offset)
        if typ == ext_type:
            return int(offset)
        assert typ != 0, f"extension {ext_type:#x} not found"
        offset += 8 + (length + 7) // 8 * 8


def set_backing_by_hand(path: Path, name: bytes, offset: int = 0x8000) -> None:
    """Store a backing file name without the backing-format extension.

    qemu-img >= 6.1 refuses `create -b` and `rebase -u -b` without -F, so the only way
    to get such an image (as written by old qemu) is to write the header ourselves.
    The name goes in the free space of the first cluster, as the spec requires.
    """
    data = bytearray(path.read_bytes())
    struct.pack_into(">QI", data, OFF_BACKING_OFFSET, offset, len(name))
    data[offset : offset + len(name)] = name
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- real images


def test_raw_image(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", path, "3M")
    info = probe(path)
    assert info == ImageInfo("raw", 3 * 1024 * 1024, None, None, None, None, None)
    assert_matches_qemu(info, path)


@pytest.mark.parametrize("content", [b"", b"Q", b"QFI", b"QFI\xfa" + bytes(200), b"x" * 5000])
def test_raw_small_and_non_magic_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "blob"
    path.write_bytes(content)
    assert probe(path) == ImageInfo("raw", len(content), None, None, None, None, None)


@pytest.mark.parametrize(("compat", "version"), [("0.10", 2), ("1.1", 3)])
def test_no_backing(tmp_path: Path, compat: str, version: int) -> None:
    path = create(tmp_path / "base.qcow2", "1G", opts=f"compat={compat}")
    info = probe(path)
    assert info == ImageInfo("qcow2", 1 << 30, 65536, version, None, None, None)
    assert_matches_qemu(info, path)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_backing_with_format(tmp_path: Path, compat: str) -> None:
    create(tmp_path / "base.qcow2", "20M")
    path = create(
        tmp_path / "top.qcow2",
        None,
        backing="base.qcow2",
        backing_fmt="qcow2",
        opts=f"compat={compat}",
    )
    info = probe(path)
    assert info.backing_file == b"base.qcow2"
    assert info.backing_format == "qcow2"
    assert info.virtual_size == 20 * 1024 * 1024  # inherited from the backing file
    assert_matches_qemu(info, path)


def test_raw_backing(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "raw", tmp_path / "base.raw", "4M")
    path = create(tmp_path / "top.qcow2", backing="base.raw", backing_fmt="raw")
    info = probe(path)
    assert (info.backing_file, info.backing_format) == (b"base.raw", "raw")
    assert_matches_qemu(info, path)
    assert probe(tmp_path / "base.raw").format == "raw"


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_backing_without_format_extension(tmp_path: Path, compat: str) -> None:
    path = create(tmp_path / "top.qcow2", "8M", opts=f"compat={compat}")
    set_backing_by_hand(path, b"old-style-base.img")
    info = probe(path)
    assert info.backing_file == b"old-style-base.img"
    assert info.backing_format is None
    ref = assert_matches_qemu(info, path)
    assert "backing-filename-format" not in ref


def test_absolute_backing_name(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2")
    sub = tmp_path / "vms"
    sub.mkdir()
    path = create(sub / "vm.qcow2", backing=str(base), backing_fmt="qcow2")
    info = probe(path)
    assert info.backing_file == os.fsencode(base)
    assert_matches_qemu(info, path)


def test_relative_backing_name_with_directories(tmp_path: Path) -> None:
    (tmp_path / "bases").mkdir()
    (tmp_path / "vms").mkdir()
    create(tmp_path / "bases" / "base.qcow2")
    path = create(tmp_path / "vms" / "vm.qcow2", backing="../bases/base.qcow2", backing_fmt="qcow2")
    info = probe(path)
    assert info.backing_file == b"../bases/base.qcow2"
    ref = assert_matches_qemu(info, path)
    assert Path(ref["full-backing-filename"]).resolve() == tmp_path / "bases" / "base.qcow2"


def test_three_level_chain(tmp_path: Path) -> None:
    """base <- tmpl (relative name) <- vm (absolute name), walked like scachefs will."""
    create(tmp_path / "base.qcow2", "64M", opts="compat=0.10")
    create(tmp_path / "tmpl.qcow2", None, backing="base.qcow2", backing_fmt="qcow2")
    vm_dir = tmp_path / "vms"
    vm_dir.mkdir()
    tmpl = str(tmp_path / "tmpl.qcow2")
    vm = create(vm_dir / "vm.qcow2", None, backing=tmpl, backing_fmt="qcow2")

    chain: list[tuple[Path, ImageInfo]] = []
    current: Path | None = vm
    while current is not None:
        info = probe(current)
        chain.append((current, info))
        if info.backing_file is None:
            current = None
        else:
            current = current.parent / os.fsdecode(info.backing_file)  # absolute wins in /

    ref = json.loads(qemu_img("info", "--backing-chain", "--output=json", vm))
    assert [p.resolve() for p, _ in chain] == [Path(r["filename"]).resolve() for r in ref]
    for (_, info), r in zip(chain, ref, strict=True):
        assert info.virtual_size == r["virtual-size"] == 64 * 1024 * 1024
        assert info.backing_format == r.get("backing-filename-format")
        expected = r.get("backing-filename")
        assert (info.backing_file.decode() if info.backing_file else None) == expected
    assert [i.version for _, i in chain] == [3, 3, 2]


def test_non_utf8_backing_name(tmp_path: Path) -> None:
    name = b"\xff\xfe-base-\xe9.qcow2"
    path = create(tmp_path / "top.qcow2", backing=name, backing_fmt="qcow2", unsafe=True)
    info = probe(path)
    assert info.backing_file == name
    assert_matches_qemu(info, path)


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * 1024 * 1024])
def test_cluster_sizes(tmp_path: Path, cluster_size: int) -> None:
    create(tmp_path / "base.qcow2")
    path = create(
        tmp_path / "top.qcow2",
        backing="base.qcow2",
        backing_fmt="qcow2",
        opts=f"cluster_size={cluster_size}",
    )
    info = probe(path)
    assert info.cluster_size == cluster_size
    assert (info.backing_file, info.backing_format) == (b"base.qcow2", "qcow2")
    assert_matches_qemu(info, path)


def test_common_image_needs_a_single_read(tmp_path: Path) -> None:
    create(tmp_path / "base.qcow2")
    path = create(tmp_path / "top.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    with pread_of(path) as pread:
        read_image_info(pread, path.stat().st_size)
        assert pread.calls == [(0, HEADER_PROBE_SIZE)]


def test_name_beyond_probe_is_fetched(tmp_path: Path) -> None:
    """A backing name far into a 2 MiB first cluster needs further, bounded reads."""
    path = create(tmp_path / "top.qcow2", opts="cluster_size=2M")
    set_backing_by_hand(path, b"far-away.qcow2", offset=2 * 1024 * 1024 - 14)
    with pread_of(path) as pread:
        info = read_image_info(pread, path.stat().st_size)
        assert len(pread.calls) > 1
        assert pread.total <= 2 * 1024 * 1024
    assert info.backing_file == b"far-away.qcow2"
    assert_matches_qemu(info, path)


def test_short_read_after_the_probe(tmp_path: Path) -> None:
    """The file shrinks between the first probe and the read of a far backing name."""
    path = create(tmp_path / "top.qcow2", opts="cluster_size=2M")
    set_backing_by_hand(path, b"far-away.qcow2", offset=1024 * 1024)
    data = path.read_bytes()

    def shrinking(offset: int, length: int) -> bytes:
        return data[offset : min(offset + length, 100_000)]

    with pytest.raises(ImageFormatError, match=r"backing file name .*stopped at 100000"):
        read_image_info(shrinking, len(data))


def test_external_data_file(tmp_path: Path) -> None:
    path = create(tmp_path / "img.qcow2", opts="data_file=img.data")
    info = probe(path)
    assert info.data_file == b"img.data"
    assert info.backing_file is None
    assert_matches_qemu(info, path)


def test_backing_size_zero_means_no_backing(tmp_path: Path) -> None:
    """qemu reads a 0-byte name (empty string) and treats it as no backing file."""
    create(tmp_path / "base.qcow2")
    path = create(tmp_path / "top.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    poke(path, OFF_BACKING_SIZE, ">I", 0)
    info = probe(path)
    assert info.backing_file is None
    # The format extension still sits before backing_file_offset, so it is reported;
    # qemu-img prints it only when there is a backing name, so compare the rest.
    assert info.backing_format == "qcow2"
    ref = qemu_info(path)
    assert "backing-filename" not in ref and "backing-filename-format" not in ref
    assert info.virtual_size == ref["virtual-size"]


def test_extension_list_may_end_at_backing_name(tmp_path: Path) -> None:
    """No end marker is needed when the extensions run right up to the backing name."""
    path = create(tmp_path / "top.qcow2", backing="base.qcow2", backing_fmt="qcow2", unsafe=True)
    end_marker = 0x208  # qemu-img's layout: extensions, 8 zero bytes, name at 0x210
    assert path.read_bytes()[end_marker : end_marker + 8] == bytes(8)
    set_backing_by_hand(path, b"base.qcow2", offset=end_marker)
    info = probe(path)
    assert (info.backing_file, info.backing_format) == (b"base.qcow2", "qcow2")
    assert_matches_qemu(info, path)


def test_unknown_extension_is_skipped(tmp_path: Path) -> None:
    create(tmp_path / "base.qcow2")
    path = create(tmp_path / "top.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    ext = find_extension(path.read_bytes(), EXT_BACKING_FORMAT)
    poke(path, ext, ">I", 0x12345678)
    info = probe(path)
    assert (info.backing_file, info.backing_format) == (b"base.qcow2", None)
    assert_matches_qemu(info, path)


def test_short_reads_are_truncation(tmp_path: Path) -> None:
    """A pread that returns less than asked (file shrank) is treated as EOF there."""
    create(tmp_path / "base.qcow2")
    path = create(tmp_path / "top.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    data = path.read_bytes()

    def short(offset: int, length: int) -> bytes:
        return data[offset : min(offset + length, 60)]

    with pytest.raises(ImageFormatError, match=r"header .*104.*60"):
        read_image_info(short, len(data))

    def name_cut(offset: int, length: int) -> bytes:
        return data[offset : min(offset + length, 0x212)]  # name starts at 0x210

    with pytest.raises(ImageFormatError, match="backing"):
        read_image_info(name_cut, len(data))


def test_negative_file_size_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="file_size") as exc:
        read_image_info(lambda _o, _n: b"", -1)
    assert not isinstance(exc.value, ImageFormatError)


# --------------------------------------------------------------------------- malformed corpus


@pytest.fixture
def v3_with_backing(tmp_path: Path) -> Path:
    """A qemu-img v3 overlay: header_length 112, backing name at 0x210 (after extensions)."""
    create(tmp_path / "base.qcow2")
    path = create(tmp_path / "top.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    data = path.read_bytes()
    assert struct.unpack_from(">QI", data, OFF_BACKING_OFFSET) == (0x210, 10)
    return path


@pytest.fixture
def v2_with_backing(tmp_path: Path) -> Path:
    create(tmp_path / "base.qcow2")
    return create(
        tmp_path / "top2.qcow2", backing="base.qcow2", backing_fmt="qcow2", opts="compat=0.10"
    )


def _truncate(size: int) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:size])

    return edit


def _poke(offset: int, fmt: str, *values: int | bytes) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        poke(path, offset, fmt, *values)

    return edit


def _poke_ext(ext_type: int, rel: int, fmt: str, *values: int | bytes) -> Callable[[Path], None]:
    """Edit bytes relative to the start of a header extension."""

    def edit(path: Path) -> None:
        poke(path, find_extension(path.read_bytes(), ext_type) + rel, fmt, *values)

    return edit


def _chain(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        for e in edits:
            e(path)

    return edit


FEATURE_TABLE = 0x6803F857

MALFORMED: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated-50-bytes": (_truncate(50), r"version 3 header \(104 bytes\).*ends at 50"),
    "truncated-7-bytes": (_truncate(7), r"version field.*offset 8.*ends at 7"),
    "truncated-in-header-length": (
        _chain(_poke(OFF_HEADER_LENGTH, ">I", 4096), _truncate(2000)),
        r"header_length = 4096.*ends at 2000",
    ),
    "version-4": (_poke(OFF_VERSION, ">I", 4), r"version = 4"),
    "version-1": (_poke(OFF_VERSION, ">I", 1), r"version = 1"),
    "cluster-bits-30": (_poke(OFF_CLUSTER_BITS, ">I", 30), r"cluster_bits = 30 .*9\.\.21"),
    "cluster-bits-8": (_poke(OFF_CLUSTER_BITS, ">I", 8), r"cluster_bits = 8 "),
    "header-length-99": (_poke(OFF_HEADER_LENGTH, ">I", 99), r"header_length = 99 .*104"),
    "header-length-unaligned": (
        _poke(OFF_HEADER_LENGTH, ">I", 108),
        r"header_length = 108 .*multiple of 8",
    ),
    "header-length-over-cluster": (
        _poke(OFF_HEADER_LENGTH, ">I", 65536 + 8),
        r"header_length = 65544 exceeds the cluster size 65536",
    ),
    "size-2**64-1": (_poke(OFF_SIZE, ">Q", 2**64 - 1), r"field size = 0xffffffffffffffff"),
    "size-2**63": (_poke(OFF_SIZE, ">Q", 2**63), r"field size = .*2\*\*63"),
    "l1-offset-2**63": (_poke(OFF_L1_TABLE_OFFSET, ">Q", 2**63), r"l1_table_offset"),
    "backing-offset-2**64-1": (_poke(OFF_BACKING_OFFSET, ">Q", 2**64 - 1), r"backing_file_offset"),
    "backing-size-1024": (_poke(OFF_BACKING_SIZE, ">I", 1024), r"backing_file_size = 1024 .*1023"),
    "backing-size-2**32-1": (_poke(OFF_BACKING_SIZE, ">I", 2**32 - 1), r"backing_file_size"),
    "backing-offset-past-eof": (
        _chain(_truncate(1024), _poke(OFF_BACKING_OFFSET, ">QI", 1000, 100)),
        r"backing_file_offset = 1000.*ends at 1100, past the end of the file at 1024",
    ),
    "backing-offset-beyond-first-cluster": (
        _poke(OFF_BACKING_OFFSET, ">Q", 70000),
        r"backing_file_offset = 70000 lies beyond the first cluster",
    ),
    "backing-name-crosses-cluster-end": (
        _poke(OFF_BACKING_OFFSET, ">QI", 65536 - 5, 10),
        r"ends at 65541, past the end of the first cluster",
    ),
    "backing-overlaps-header": (
        _poke(OFF_BACKING_OFFSET, ">QI", 0x40, 10),
        r"backing_file_offset = 64.*overlaps the 112-byte header",
    ),
    "nul-in-backing-name": (
        _poke(0x210 + 4, ">B", 0),
        r"backing file name .*NUL byte at position 4",
    ),
    "extension-length-overflow": (
        _poke_ext(EXT_BACKING_FORMAT, 4, ">I", 0xFFFFFFF0),
        r"extension 0xe2792aca at offset 112: length 4294967280 runs past .*backing_file_offset",
    ),
    "extension-runs-into-backing-name": (
        _poke_ext(FEATURE_TABLE, 4, ">I", 0x210 - 0x80 - 8 + 1),
        r"extension 0x6803f857 at offset 128: length 393 .*backing_file_offset 528",
    ),
    "extension-runs-past-first-cluster": (
        _chain(_poke(OFF_BACKING_OFFSET, ">QI", 0, 0), _poke_ext(FEATURE_TABLE, 4, ">I", 65536)),
        r"length 65536 runs past the end of the extension area \(end of the first cluster",
    ),
    "extension-runs-past-eof": (
        _chain(
            _poke(OFF_BACKING_OFFSET, ">QI", 0, 0),
            _poke_ext(FEATURE_TABLE, 4, ">I", 4000),
            _truncate(3000),
        ),
        r"length 4000 runs past the end of the file at 3000",
    ),
    "extension-list-cut-by-eof": (
        # Replace the end marker at 0x208 by an empty unknown extension, cut the file
        # inside the next 8-byte extension header at 0x210.
        _chain(_poke(OFF_BACKING_OFFSET, ">QI", 0, 0), _poke(0x208, ">II", 1, 0), _truncate(0x214)),
        r"header extension at offset 528 needs the file to extend to offset 536, .*ends at 532",
    ),
    "extension-header-straddles-end": (
        _poke(OFF_BACKING_OFFSET, ">Q", 0x74),
        r"offset 112: its 8-byte type/length does not fit .*backing_file_offset 116",
    ),
    "backing-format-not-ascii": (
        _poke_ext(EXT_BACKING_FORMAT, 8, ">B", 0xE9),
        r"backing format .*byte 0xe9 at position 0 is not ASCII",
    ),
    "backing-format-too-long": (
        _poke_ext(EXT_BACKING_FORMAT, 4, ">I", 16),
        r"backing format .*length 16 exceeds .*15",
    ),
    "backing-format-nul": (
        _poke_ext(EXT_BACKING_FORMAT, 8 + 2, ">B", 0),
        r"backing format header extension 0xe2792aca .*NUL byte at position 2",
    ),
    "backing-format-twice": (
        _chain(
            _poke_ext(FEATURE_TABLE, 4, ">I", 3),
            _poke_ext(FEATURE_TABLE, 0, ">I", EXT_BACKING_FORMAT),
        ),
        r"backing format header extension 0xe2792aca appears twice \(again at offset 128\)",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_v3(v3_with_backing: Path, case: str) -> None:
    edit, message = MALFORMED[case]
    edit(v3_with_backing)
    with pytest.raises(ImageFormatError, match=message):
        probe(v3_with_backing)


MALFORMED_V2: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated-60-bytes": (_truncate(60), r"version 2 header \(72 bytes\).*ends at 60"),
    "backing-overlaps-header": (
        _poke(OFF_BACKING_OFFSET, ">Q", 0x40),
        r"overlaps the 72-byte header",
    ),
    "extension-overflow": (
        _poke_ext(EXT_BACKING_FORMAT, 4, ">I", 0x100),
        r"extension 0xe2792aca at offset 72: length 256 .*backing_file_offset 96",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_V2))
def test_malformed_v2(v2_with_backing: Path, case: str) -> None:
    edit, message = MALFORMED_V2[case]
    edit(v2_with_backing)
    with pytest.raises(ImageFormatError, match=message):
        probe(v2_with_backing)


def test_qemu_rejects_what_we_reject(v3_with_backing: Path) -> None:
    """Spot-check that a few corpus entries are also refused by qemu itself."""
    for case in [
        "version-4",
        "cluster-bits-30",
        "header-length-99",
        "backing-size-1024",
        "backing-offset-beyond-first-cluster",
        "extension-length-overflow",
    ]:
        path = v3_with_backing.with_name(f"{case}.qcow2")
        shutil.copy(v3_with_backing, path)
        MALFORMED[case][0](path)
        proc = subprocess.run(["qemu-img", "info", path], capture_output=True, check=False)
        assert proc.returncode != 0, case


def test_qemu_accepts_header_overlap_that_we_reject(v3_with_backing: Path) -> None:
    """qemu reads the 'name' from inside the header (here zeros: an empty string) and
    silently shows no backing file; we refuse such a header instead of guessing."""
    MALFORMED["backing-overlaps-header"][0](v3_with_backing)
    assert "backing-filename" not in qemu_info(v3_with_backing)
    with pytest.raises(ImageFormatError):
        probe(v3_with_backing)


# --------------------------------------------------------------------------- fuzzing


class RecordingPread:
    """pread over bytes that may be shorter than the size the caller was told."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []

    def __call__(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        return self.data[offset : offset + length]


def check_probe(data: bytes, claimed_extra: int = 0) -> ImageInfo | None:
    """The fuzz oracle: only ImageFormatError escapes, and reads stay in bounds."""
    file_size = len(data) + claimed_extra
    pread = RecordingPread(data)
    try:
        info: ImageInfo | None = read_image_info(pread, file_size)
    except ImageFormatError as exc:
        assert str(exc)
        info = None
    assert sum(n for _, n in pread.calls) <= READ_CAP
    for offset, length in pread.calls:
        assert offset >= 0 and length > 0 and offset + length <= file_size
    if info is not None:
        assert info.format in ("raw", "qcow2")
        if info.backing_file is not None:
            assert 0 < len(info.backing_file) <= 1023 and b"\0" not in info.backing_file
        if info.format == "qcow2":
            assert info.virtual_size < 2**63 and info.version in (2, 3)
    return info


@pytest.fixture(scope="module")
def valid_v3_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """First 8 KiB of a real v3 overlay with a backing name and format (fast to mutate)."""
    d = tmp_path_factory.mktemp("fuzzbase")
    create(d / "base.qcow2")
    path = create(d / "top.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    data = path.read_bytes()[:8192]
    assert check_probe(data) is not None
    return data


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(
    body=st.binary(max_size=700),
    force_magic=st.booleans(),
    claimed_extra=st.sampled_from([0, 0, 0, 1, 4096]),
)
def test_fuzz_random_bytes(body: bytes, force_magic: bool, claimed_extra: int) -> None:
    data = b"QFI\xfb" + body if force_magic else body
    check_probe(data, claimed_extra)


INTERESTING_U32 = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    9,
    16,
    21,
    22,
    63,
    64,
    72,
    104,
    112,
    1023,
    1024,
    4096,
    65535,
    65536,
    2**31 - 1,
    2**31,
    2**32 - 1,
]


@FUZZ
@given(
    version=st.sampled_from([2, 3, 0, 4, 2**32 - 1]),
    cluster_bits=st.sampled_from([9, 12, 16, 21, 8, 22, 0, 63]),
    backing_offset=st.sampled_from([0, 72, 104, 112, 200, 511, 512, 4095, 4096, 2**63, 2**64 - 1]),
    backing_size=st.sampled_from(INTERESTING_U32),
    header_length=st.sampled_from(INTERESTING_U32),
    tail=st.binary(max_size=600),
    exts=st.lists(
        st.tuples(
            st.sampled_from([0, EXT_BACKING_FORMAT, EXT_DATA_FILE, FEATURE_TABLE, 0x1234]),
            st.sampled_from([0, 1, 5, 8, 15, 16, 100, 2**32 - 1]),
            st.binary(max_size=24),
        ),
        max_size=4,
    ),
)
def test_fuzz_structured_headers(
    version: int,
    cluster_bits: int,
    backing_offset: int,
    backing_size: int,
    header_length: int,
    tail: bytes,
    exts: list[tuple[int, int, bytes]],
) -> None:
    """Headers whose fields take boundary values, so the deep checks are reached."""
    header = bytearray(
        struct.pack(">4sIQII", b"QFI\xfb", version, backing_offset, backing_size, cluster_bits)
    )
    header += struct.pack(">QIIQQIIQ", 1 << 30, 0, 0, 0, 0, 0, 0, 0)
    header += struct.pack(">QQQII", 0, 0, 0, 4, header_length)
    if version == 3 and 104 <= header_length <= 512:
        header += bytes(header_length - len(header))
    for typ, length, payload in exts:
        header += struct.pack(">II", typ, length) + payload
    check_probe(bytes(header) + tail)


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_real_header(valid_v3_bytes: bytes, data: st.DataObject) -> None:
    buf = bytearray(valid_v3_bytes)
    hot = st.integers(0, 0x230)  # header, extensions and the backing name
    anywhere = st.integers(0, len(buf) - 1)
    edits = data.draw(
        st.lists(
            st.tuples(
                st.one_of(hot, hot, anywhere),
                st.one_of(
                    st.binary(min_size=1, max_size=1),
                    st.binary(min_size=2, max_size=8),
                    st.sampled_from([b"\0", b"\xff" * 4, b"\0" * 4, b"\x7f\xff\xff\xff"]),
                ),
            ),
            min_size=1,
            max_size=6,
        )
    )
    for offset, patch in edits:
        buf[offset : offset + len(patch)] = patch
    cut = data.draw(st.one_of(st.just(len(buf)), st.integers(0, len(buf))))
    claimed_extra = data.draw(st.sampled_from([0, 0, 0, 100]))
    check_probe(bytes(buf[:cut]), claimed_extra)


def test_fuzz_oracle_sees_valid_image(valid_v3_bytes: bytes) -> None:
    info = check_probe(valid_v3_bytes)
    assert info is not None and info.backing_file == b"base.qcow2"
