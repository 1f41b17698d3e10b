"""Tests for scachefs.traces: file format, corrupt-input rejection, merge, run planner, store."""

from __future__ import annotations

import errno
import itertools
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scachefs import traces
from scachefs.traces import (
    MAGIC,
    MAX_BOOTS_PER_FILE,
    MAX_ENTRIES,
    MAX_FILE_BYTES,
    RECENT_BOOTS,
    SUFFIX,
    Boot,
    LayerId,
    TraceError,
    TraceFile,
    TraceStore,
    WorkingSet,
    decode,
    encode,
    file_name,
    merge,
    min_boots_for,
    plan_runs,
)

KiB = 1024
MiB = 1024 * KiB
CS = 4 * KiB  # the chunk size used by most tests

# The on-disk layout, spelled out independently of the module's private structs so a
# change of the format (field order, widths, endianness) makes the tests fail.
HEADER = struct.Struct("<8sHHI16sQQ64s256sII")
BOOT = struct.Struct("<QIIQI")
ENTRY = struct.Struct("<QIQ")
TRAILER = struct.Struct("<Q")
HEADER_FIELDS = ("magic", "version", "reserved", "chunk_size", "fingerprint", "size",
                 "mtime_ns", "host", "path", "boots", "entries")
# byte ranges of the header fields
OFF_MAGIC = range(0, 8)
OFF_VERSION = range(8, 10)
OFF_CHUNK_SIZE = range(12, 16)
OFF_COUNTS = range(368, 376)



def fp(n: int) -> bytes:
    """A made-up 16-byte layer fingerprint."""
    return n.to_bytes(16, "little")


LAYER = LayerId(fp(7), size=64 * MiB, mtime_ns=1_700_000_000_123_456_789)
PREFIX = f"fp-{LAYER.hex}"


def boot(started: int, chunks: list[tuple[int, int, int]], *, duration_ms: int = 1500,
         requests: int = 10, nbytes: int = 40960) -> Boot:
    return Boot(started, duration_ms, requests, nbytes, chunks)


def trace(boots: list[Boot], *, host: str = "node1", layer: LayerId = LAYER,
          chunk_size: int = CS) -> TraceFile:
    return TraceFile(layer, chunk_size, host, boots)


def sample_trace() -> TraceFile:
    return trace([
        boot(1000, [(0, 0, 0xDEADBEEF), (5, 12, 1), (3, 40, 2**64 - 1)]),
        boot(2000, [(5, 1, 7)], duration_ms=0, requests=0, nbytes=0),
        boot(3000, []),
        boot(4000, [(100, 2**32 - 1, 42), (0, 3, 9)], duration_ms=2**32 - 1,
             requests=2**32 - 1, nbytes=2**64 - 1),
    ])


def reseal(data: bytes) -> bytes:
    """Recompute the trailer so only the deliberate damage is wrong."""
    body = data[:-TRAILER.size]
    return body + TRAILER.pack(xxhash.xxh3_64_intdigest(body))


def patch_header(data: bytes, **changes: object) -> bytes:
    fields = dict(zip(HEADER_FIELDS, HEADER.unpack_from(data), strict=True))
    assert set(changes) <= set(fields)
    fields.update(changes)
    return reseal(HEADER.pack(*fields.values()) + data[HEADER.size:])


def patch_boot_count(data: bytes, index: int, count: int) -> bytes:
    offset = HEADER.size + index * BOOT.size
    fields = list(BOOT.unpack_from(data, offset))
    fields[-1] = count
    return reseal(data[:offset] + BOOT.pack(*fields) + data[offset + BOOT.size:])


def decode_error(data: bytes, fingerprint: bytes | None = None) -> str:
    """decode must raise TraceError (pytest.raises fails on any other exception)."""
    with pytest.raises(TraceError) as info:
        decode(data, fingerprint=fingerprint)
    return str(info.value)


# ---------------------------------------------------------------------------------------
# encode / decode


def test_round_trip_several_boots() -> None:
    original = sample_trace()
    data = encode(original)
    assert decode(data) == original
    assert decode(data, fingerprint=LAYER.fingerprint) == original


def test_round_trip_empty_boot_list() -> None:
    original = trace([])
    data = encode(original)
    assert len(data) == HEADER.size + TRAILER.size
    assert decode(data) == original


@pytest.mark.parametrize("host", ["hôte-ü-主机", "a" * 64, "é" * 32, "x", "host.example.org"])
def test_round_trip_host_names(host: str) -> None:
    assert len(host.encode()) <= 64
    original = trace([boot(1, [(1, 2, 3)])], host=host)
    assert decode(encode(original)).host == host


def test_encoding_matches_the_documented_layout() -> None:
    layer = LayerId(fp(0x0102030405060708), size=10 * CS, mtime_ns=99)
    original = trace([boot(11, [(1, 5, 0xAA), (2, 6, 0xBB)], duration_ms=22, requests=33,
                           nbytes=44),
                      boot(12, [(9, 0, 0xCC)], duration_ms=1, requests=2, nbytes=3)],
                     host="h1", layer=layer)
    body = (HEADER.pack(b"SCTRACE\0", 2, 0, CS, layer.fingerprint, layer.size, 99,
                        b"h1".ljust(64, b"\0"), b"".ljust(256, b"\0"), 2, 3)
            + BOOT.pack(11, 22, 33, 44, 2) + BOOT.pack(12, 1, 2, 3, 1)
            + ENTRY.pack(1, 5, 0xAA) + ENTRY.pack(2, 6, 0xBB) + ENTRY.pack(9, 0, 0xCC))
    expected = body + TRAILER.pack(xxhash.xxh3_64_intdigest(body))
    assert encode(original) == expected
    assert decode(expected) == original


def test_chunk_size_bounds_accepted() -> None:
    for chunk_size in (4096, 8192, 1 << 20):
        original = trace([boot(1, [(0, 0, 0)])], chunk_size=chunk_size)
        assert decode(encode(original)).chunk_size == chunk_size


def test_reserved_field_is_ignored_when_checksum_valid() -> None:
    original = sample_trace()
    assert decode(patch_header(encode(original), reserved=0xFFFF)) == original


def test_encode_keeps_only_the_most_recent_boots() -> None:
    boots = [boot(1000 + i, [(i, i, i)]) for i in range(MAX_BOOTS_PER_FILE + 4)]
    decoded = decode(encode(trace(boots)))
    assert decoded.boots == boots[-MAX_BOOTS_PER_FILE:]
    assert len(decoded.boots) == MAX_BOOTS_PER_FILE


def test_encode_refuses_too_many_entries() -> None:
    entries = [(0, 0, 0)] * (MAX_ENTRIES + 1)  # one shared tuple: cheap
    with pytest.raises(TraceError, match="too large"):
        encode(trace([boot(1, entries)], layer=LayerId(fp(7), 1 << 40, 0)))


def test_encode_counts_only_the_kept_boots_against_the_entry_limit() -> None:
    # the dropped boot is huge, the kept ones are small: must encode fine
    dropped = boot(0, [(0, 0, 0)] * (MAX_ENTRIES + 1))
    kept = [boot(i + 1, [(1, 1, 1)]) for i in range(MAX_BOOTS_PER_FILE)]
    decoded = decode(encode(trace([dropped, *kept])))
    assert decoded.boots == kept


@pytest.mark.parametrize(("host", "safe"), [
    ("node1", "node1"),
    ("node-1_b", "node-1_b"),
    ("host.example.org", "host_example_org"),
    ("../../etc/passwd", "______etc_passwd"),
    ("a/b", "a_b"),
    ("a b\tc\nd", "a_b_c_d"),
    ("nul\0byte", "nul_byte"),
    ("", "host"),
    ("x" * 100, "x" * 64),
    ("hôte主机", "h_te__"),  # non-ASCII becomes _: portable names on any store
])
def test_file_name_sanitises(host: str, safe: str) -> None:
    name = file_name(fp(123), host)
    assert isinstance(name, bytes)
    assert name == f"fp-{fp(123).hex()}.{safe}{SUFFIX}".encode()


@pytest.mark.parametrize("host", ["a/b", "..", ".", "/", "a\0b", "..\\x", "a.b.c", "\udcff"])
def test_file_name_is_a_single_safe_component(host: str) -> None:
    name = file_name(fp(5), host)
    assert b"/" not in name and b"\0" not in name
    assert name.startswith(f"fp-{fp(5).hex()}.".encode()) and name.endswith(SUFFIX.encode())
    assert name.count(b".") == 2  # the host part has no dot: no "..", no suffix games
    assert name not in (b".", b"..")


def test_file_names_of_different_layers_do_not_share_a_prefix() -> None:
    # load() selects by the prefix "fp-<fingerprint>.": one layer never picks up another's
    assert not file_name(fp(5 << 120), "h").startswith(f"fp-{fp(5).hex()}.".encode())
    with pytest.raises(TraceError):
        file_name(b"short", "h")


# ---------------------------------------------------------------------------------------
# corrupt inputs


def test_every_bit_flip_is_rejected_with_the_right_reason() -> None:
    data = encode(sample_trace())
    for pos in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[pos] ^= 1 << bit
            message = decode_error(bytes(damaged))
            if pos in OFF_MAGIC:
                assert "magic" in message
            elif pos in OFF_VERSION:
                assert "version" in message
            elif pos in OFF_CHUNK_SIZE:
                assert "chunk size" in message
            elif pos in OFF_COUNTS:
                assert "declared counts" in message or "truncated or padded" in message
            else:  # reserved, ino, size, mtime, host, boots, entries, trailer
                assert "checksum" in message, (pos, bit, message)


def test_every_truncation_is_rejected() -> None:
    data = encode(sample_trace())
    for length in range(len(data)):
        assert "truncated" in decode_error(data[:length]), length


@pytest.mark.parametrize("extra", [b"\0", b"x" * 8, b"\0" * 20])
def test_padding_is_rejected(extra: bytes) -> None:
    assert "padded" in decode_error(encode(sample_trace()) + extra)


def test_trailing_entry_appended_with_valid_checksum_is_rejected() -> None:
    data = encode(sample_trace())
    padded = reseal(data[:-TRAILER.size] + ENTRY.pack(1, 1, 1) + data[-TRAILER.size:])
    assert "padded" in decode_error(padded)


@pytest.mark.parametrize("magic", [b"SCTRACE\1", b"\0" * 8, b"QFI\xfb\0\0\0\3", b"sctrace\0"])
def test_wrong_magic(magic: bytes) -> None:
    assert "magic" in decode_error(patch_header(encode(sample_trace()), magic=magic))


@pytest.mark.parametrize("version", [0, 3, 0xFFFF])
def test_wrong_version(version: int) -> None:
    message = decode_error(patch_header(encode(sample_trace()), version=version))
    assert "version" in message and str(version) in message


@pytest.mark.parametrize(("nboots", "nentries"), [
    (MAX_BOOTS_PER_FILE + 1, 0),
    (2**32 - 1, 0),
    (0, MAX_ENTRIES + 1),
    (0, 2**32 - 1),
    (2**32 - 1, 2**32 - 1),
])
def test_giant_declared_counts(nboots: int, nentries: int) -> None:
    data = patch_header(encode(trace([])), boots=nboots, entries=nentries)
    assert "declared counts too large" in decode_error(data)


def test_plausible_counts_larger_than_the_file() -> None:
    data = patch_header(encode(sample_trace()), entries=MAX_ENTRIES)
    assert "truncated or padded" in decode_error(data)


def test_oversized_data() -> None:
    assert "oversized" in decode_error(b"\0" * (MAX_FILE_BYTES + 1))
    valid = encode(sample_trace())
    assert "oversized" in decode_error(valid + b"\0" * (MAX_FILE_BYTES + 1 - len(valid)))


def test_trace_of_another_layer() -> None:
    data = encode(sample_trace())
    message = decode_error(data, fingerprint=fp(8))
    assert "another layer" in message and LAYER.hex in message
    assert decode(data, fingerprint=LAYER.fingerprint).layer == LAYER


def test_an_all_zero_fingerprint_is_checked() -> None:
    # the check must be "is not None", not truthiness
    assert "another layer" in decode_error(encode(sample_trace()), fingerprint=bytes(16))


def test_chunk_past_the_end_of_the_layer() -> None:
    layer = LayerId(fp(7), 2 * CS + 100, 0)  # chunks 0, 1 and a partial chunk 2
    assert decode(encode(trace([boot(1, [(2, 0, 0)])], layer=layer))).boots[0].chunks
    message = decode_error(encode(trace([boot(1, [(0, 0, 0), (3, 0, 0)])], layer=layer)))
    assert "past the end" in message and "chunk 3" in message
    assert "past the end" in decode_error(
        encode(trace([boot(1, [(2**64 - 1, 0, 0)])], layer=layer)))


def test_chunk_at_exact_layer_end_is_past_the_end() -> None:
    layer = LayerId(fp(7), 2 * CS, 0)  # exactly chunks 0 and 1
    assert "past the end" in decode_error(encode(trace([boot(1, [(2, 0, 0)])], layer=layer)))


def test_boots_declaring_more_entries_than_present() -> None:
    data = encode(trace([boot(1, [(1, 0, 0), (2, 0, 0)]), boot(2, [(3, 0, 0)])]))
    assert "more entries" in decode_error(patch_boot_count(data, 0, 3))
    assert "more entries" in decode_error(patch_boot_count(data, 1, 2))
    message = decode_error(patch_boot_count(data, 0, 4))  # more than the whole file
    assert "declares 4 entries" in message
    assert "declares" in decode_error(patch_boot_count(data, 1, 2**32 - 1))


def test_boots_declaring_fewer_entries_than_present() -> None:
    data = encode(trace([boot(1, [(1, 0, 0), (2, 0, 0)]), boot(2, [(3, 0, 0)])]))
    assert "fewer entries" in decode_error(patch_boot_count(data, 0, 1))
    assert "fewer entries" in decode_error(patch_boot_count(data, 1, 0))
    assert "fewer entries" in decode_error(patch_boot_count(patch_boot_count(data, 0, 0), 1, 0))


def test_entries_declared_without_boots() -> None:
    data = encode(trace([boot(1, [(1, 0, 0)])]))
    body = data[:HEADER.size] + data[HEADER.size + BOOT.size:]  # drop the boot record
    assert "fewer entries" in decode_error(patch_header(body, boots=0))


@pytest.mark.parametrize("host", [b"\xff\xfe", b"ok\xc3", b"\xed\xa0\x80"])
def test_non_utf8_host(host: bytes) -> None:
    message = decode_error(patch_header(encode(sample_trace()), host=host.ljust(64, b"\0")))
    assert "UTF-8" in message


@pytest.mark.parametrize("chunk_size", [0, 1, 2048, 4095, 4097, 3 * 4096, 2 << 20, 2**32 - 1])
def test_bad_chunk_size(chunk_size: int) -> None:
    message = decode_error(patch_header(encode(sample_trace()), chunk_size=chunk_size))
    assert f"bad chunk size {chunk_size}" in message


def test_trace_error_is_a_value_error() -> None:
    assert issubclass(TraceError, ValueError)


# ---------------------------------------------------------------------------------------
# property: decode never raises anything but TraceError


VALID = encode(sample_trace())
VALID_PREFIX = MAGIC + struct.pack("<HHI", 2, 0, CS)

mutation = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend"]),
    st.integers(min_value=0, max_value=1 << 20),
    st.integers(min_value=0, max_value=255),
)


def check_decode(data: bytes) -> None:
    try:
        result = decode(data)
    except TraceError as exc:
        assert str(exc)  # always says what is wrong
        return
    assert isinstance(result, TraceFile)
    if result.version == traces.VERSION:  # format 1 is read, never written
        assert decode(encode(result)) == result  # whatever is accepted is consistent


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, where, value in ops:
        pos = where % (len(buf) + 1)
        if op == "flip" and buf:
            buf[pos % len(buf)] ^= 1 << (value % 8)
        elif op == "set" and buf:
            buf[pos % len(buf)] = value
        elif op == "insert":
            buf[pos:pos] = bytes([value]) * (1 + value % 24)
        elif op == "delete":
            del buf[pos:pos + 1 + value % 24]
        elif op == "truncate":
            del buf[pos:]
        elif op == "extend":
            buf += bytes([value]) * (1 + value % 40)
    return bytes(buf)


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=700),
                      st.binary(max_size=700).map(lambda tail: VALID_PREFIX + tail)),
       sealed=st.booleans())
def test_random_bytes_only_raise_trace_error(data: bytes, sealed: bool) -> None:
    if sealed and len(data) >= TRAILER.size:
        data = reseal(data)
    check_decode(data)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(mutation, min_size=1, max_size=6), sealed=st.booleans())
def test_mutated_traces_only_raise_trace_error(ops: list[tuple[str, int, int]],
                                               sealed: bool) -> None:
    data = mutate(VALID, ops)
    if sealed and len(data) >= TRAILER.size:
        data = reseal(data)  # gets the damage past the checksum, into the parser
    check_decode(data)


u32 = st.integers(min_value=0, max_value=2**32 - 1)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)  # a signed time (pre-1970 too)


@settings(max_examples=300, deadline=None)
@given(header=st.fixed_dictionaries({}, optional={
           "version": st.sampled_from([0, 1, 2]),
           "chunk_size": st.sampled_from([0, 4096, 4097, 1 << 20, 1 << 21]),
           "fingerprint": st.binary(min_size=16, max_size=16),
           "path": st.binary(max_size=256),
           "size": st.one_of(st.integers(0, 1 << 22), u64),
           "host": st.binary(max_size=64),
           "boots": st.one_of(st.integers(0, 10), u32),
           "entries": st.one_of(st.integers(0, 10), u32),
       }),
       counts=st.lists(st.tuples(st.integers(0, 3), st.one_of(st.integers(0, 12), u32)),
                       max_size=3))
def test_header_and_count_damage_only_raises_trace_error(
        header: dict[str, object], counts: list[tuple[int, int]]) -> None:
    data = patch_header(VALID, **header)
    for index, count in counts:
        if HEADER.size + (index + 1) * BOOT.size <= len(data) - TRAILER.size:
            data = patch_boot_count(data, index, count)
    check_decode(data)


@st.composite
def trace_files(draw: st.DrawFn) -> TraceFile:
    chunk_size = 1 << draw(st.integers(12, 20))
    nchunks = draw(st.integers(1, 1000))
    size = draw(st.integers((nchunks - 1) * chunk_size + 1, nchunks * chunk_size))
    layer = LayerId(draw(st.binary(min_size=16, max_size=16)), size, draw(i64))
    host = draw(st.text(max_size=64).filter(
        lambda h: len(h.encode("utf-8", "surrogatepass")) <= 64 and not h.endswith("\0")))
    try:
        host.encode()
    except UnicodeEncodeError:
        host = "h"
    entry = st.tuples(st.integers(0, nchunks - 1), u32, u64)
    boots = draw(st.lists(st.builds(Boot, u64, u32, u32, u64, st.lists(entry, max_size=20)),
                          max_size=MAX_BOOTS_PER_FILE))
    return TraceFile(layer, chunk_size, host, boots)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(original=trace_files())
def test_round_trip_property(original: TraceFile) -> None:
    assert decode(encode(original), fingerprint=original.layer.fingerprint) == original


# ---------------------------------------------------------------------------------------
# merge


@pytest.mark.parametrize(("boots", "need"), [
    (0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (12, 3), (13, 4), (16, 4),
])
def test_min_boots_for(boots: int, need: int) -> None:
    assert min_boots_for(boots) == need
    if boots >= 4:
        assert need == math.ceil(boots / 4)


def test_merge_of_nothing() -> None:
    assert merge([], LAYER, CS) is None
    assert merge([trace([])], LAYER, CS) is None


def test_merge_unions_hosts_in_first_access_order() -> None:
    a = trace([boot(100, [(10, 50, 0xA10), (11, 5, 0xA11)])], host="a")
    b = trace([boot(200, [(20, 1, 0xB20), (10, 3, 0xB10), (30, 5, 0xB30)])], host="b")
    ws = merge([a, b], LAYER, CS)
    assert isinstance(ws, WorkingSet)
    assert ws.chunks == [20, 10, 11, 30]  # by earliest first access, ties by chunk index
    assert ws.digests == {20: 0xB20, 10: 0xB10, 11: 0xA11, 30: 0xB30}
    assert (ws.boots, ws.hosts, ws.chunk_size) == (2, 2, CS)
    assert ws.bytes == 4 * CS
    assert ws.current


def test_merge_newest_digest_wins_whatever_the_input_order() -> None:
    newest = trace([boot(300, [(1, 9, 0x300)])], host="new")
    oldest = trace([boot(100, [(1, 1, 0x100), (2, 2, 0x102)])], host="old")
    middle = trace([boot(200, [(1, 5, 0x200), (2, 5, 0x202)]), boot(250, [(3, 0, 0x250)])],
                   host="mid")
    for files in ([newest, oldest, middle], [oldest, middle, newest], [middle, newest, oldest]):
        ws = merge(files, LAYER, CS)
        assert ws is not None
        assert ws.digests == {1: 0x300, 2: 0x202, 3: 0x250}
        assert ws.chunks == [3, 1, 2]  # first access: 3 at 0 ms, 1 at 1 ms, 2 at 2 ms


def test_merge_converts_other_chunk_sizes_to_byte_ranges() -> None:
    good = trace([boot(100, [(1, 5, 1)])], host="a")
    # Chunk 1 of 2*CS is bytes 2*CS..4*CS: chunks 2 and 3 at CS; chunk 2 is chunks 4, 5.
    other = trace([boot(200, [(1, 0, 99), (2, 3, 2)])], host="b", chunk_size=2 * CS)
    ws = merge([good, other], LAYER, CS)
    assert ws is not None
    assert ws.chunks == [2, 3, 4, 5, 1] and ws.digests == {1: 1}
    assert (ws.boots, ws.hosts, ws.converted, ws.chunk_sizes) == (2, 2, 1, [CS, 2 * CS])
    # Their digests are checked over the bytes they were taken of.
    assert ws.checks == {3: [(2 * CS, 2 * CS, 99)], 5: [(4 * CS, 2 * CS, 2)]}


def test_merge_converts_to_a_larger_chunk_size() -> None:
    small = trace([boot(100, [(4, 0, 40), (5, 1, 50), (9, 2, 90), (0, 7, 1)])],
                  chunk_size=CS)
    ws = merge([small], LAYER, 4 * CS)
    assert ws is not None
    assert ws.chunks == [1, 2, 0] and ws.digests == {} and ws.converted == 1
    assert ws.checks == {1: [(4 * CS, CS, 40), (5 * CS, CS, 50)], 2: [(9 * CS, CS, 90)],
                         0: [(0, CS, 1)]}
    assert ws.bytes == 3 * 4 * CS


def test_merge_converted_boots_count_once_each_for_the_minority_rule() -> None:
    # Four boots at CS/... one boot that read four small chunks of one big chunk
    # counts once for it, not four times.
    boots = [boot(i, [(0, 0, 1)]) for i in range(3)]
    boots.append(boot(10, [(4, 0, 4), (5, 0, 5), (6, 0, 6), (7, 0, 7)]))
    ws = merge([trace(boots)], LAYER, 4 * CS)
    assert ws is not None and ws.chunks == [0, 1]  # 4 boots: a chunk needs one
    more = [*boots, boot(11, [(0, 0, 1)]), boot(12, [(0, 0, 1)]), boot(13, [(0, 0, 1)]),
            boot(14, [(0, 0, 1)])]  # 8 boots: a chunk needs two
    ws = merge([trace(more[-8:])], LAYER, 4 * CS)
    assert ws is not None and ws.chunks == [0]


def test_merge_counts_the_same_boot_in_two_files_once() -> None:
    one = boot(100, [(1, 1, 1), (2, 2, 2)])
    ws = merge([trace([one], host="a"), trace([one], host="import-a")], LAYER, CS)
    assert ws is not None and ws.boots == 1


def test_merge_current_flag() -> None:
    stale = LayerId(LAYER.fingerprint, LAYER.size, LAYER.mtime_ns + 1_000_000_000)
    resized = LayerId(LAYER.fingerprint, LAYER.size + CS, LAYER.mtime_ns)
    now = trace([boot(100, [(1, 1, 1)])], host="a")
    old = trace([boot(200, [(2, 1, 1)])], host="b", layer=stale)
    grown = trace([boot(300, [(3, 1, 1)])], host="c", layer=resized)
    assert merge([now], LAYER, CS).current  # type: ignore[union-attr]
    assert not merge([old], LAYER, CS).current  # type: ignore[union-attr]
    assert not merge([old, grown], LAYER, CS).current  # type: ignore[union-attr]
    assert merge([old, now, grown], LAYER, CS).current  # type: ignore[union-attr]
    # a trace of another chunk size does not make the set current
    other = trace([boot(100, [(1, 1, 1)])], chunk_size=2 * CS)
    assert not merge([old, other], LAYER, CS).current  # type: ignore[union-attr]


def test_merge_keeps_every_chunk_below_four_boots() -> None:
    files = [trace([boot(i, [(i, 0, 0)])], host=f"h{i}") for i in range(3)]
    ws = merge(files, LAYER, CS)
    assert ws is not None and sorted(ws.chunks) == [0, 1, 2]
    ws = merge([trace([boot(i, [(i, 0, 0)]) for i in range(4)])], LAYER, CS)
    assert ws is not None and sorted(ws.chunks) == [0, 1, 2, 3]  # 4 boots: need 1


def test_merge_minority_rule_drops_one_off_reads() -> None:
    # 5 boots need 2: chunk 1 in every boot, 2 in two boots, 3 in one boot only
    boots = [boot(100, [(1, 0, 0), (2, 0, 0), (3, 0, 0)]), boot(101, [(1, 0, 0), (2, 0, 0)])]
    boots += [boot(102 + i, [(1, 0, 0)]) for i in range(3)]
    ws = merge([trace(boots[:3], host="a"), trace(boots[3:], host="b")], LAYER, CS)
    assert ws is not None
    assert ws.boots == 5
    assert sorted(ws.chunks) == [1, 2]
    assert set(ws.digests) == {1, 2}


def test_merge_minority_rule_at_sixteen_boots() -> None:
    # 16 boots need 4: chunk 7 read by 4 boots stays, chunk 8 read by 3 goes
    boots = [boot(i, [(0, 0, 0)] + [(7, 1, 0)] * (i < 4) + [(8, 1, 0)] * (i >= 13))
             for i in range(16)]
    files = [trace(boots[i::4], host=f"h{i}") for i in range(4)]
    ws = merge(files, LAYER, CS)
    assert ws is not None
    assert (ws.boots, ws.hosts) == (16, 4)
    assert ws.chunks == [0, 7]


def test_merge_counts_only_the_most_recent_boots() -> None:
    total = RECENT_BOOTS + 4
    boots = []
    for i in range(total):  # started == i: boots 0..3 are the old ones
        chunks = [(0, 100, 0x1000 + i)]
        if i < 4:
            chunks += [(1, 0, 0)]  # read by the 4 oldest only
        if i >= total - 4:
            chunks += [(2, 50, 0)]  # read by the 4 newest only
        boots.append(boot(i, chunks))
    boots[0].chunks[0] = (0, 1, 0x1000)  # oldest boot read chunk 0 first: must not count
    # spread over hosts, shuffled, with the old boots in the file listed first
    files = [trace(boots[i::3][::-1], host=f"h{i}") for i in range(3)]
    ws = merge(files, LAYER, CS)
    assert ws is not None
    assert ws.boots == RECENT_BOOTS
    assert ws.chunks == [2, 0]  # chunk 1 only in boots not merged; chunk 0 first at 100 ms
    assert ws.digests == {0: 0x1000 + total - 1, 2: 0}


def test_merge_minority_threshold_uses_recent_boots_only() -> None:
    # 20 boots, 16 merged: need 4. A chunk read by the 4 newest stays, one read by the
    # 5 oldest (4 of which are not merged, 1 is) goes.
    boots = [boot(i, [(0, 0, 0)] + [(1, 0, 0)] * (i >= 16) + [(2, 0, 0)] * (i < 5))
             for i in range(20)]
    ws = merge([trace(boots)], LAYER, CS)
    assert ws is not None
    assert sorted(ws.chunks) == [0, 1]


# ---------------------------------------------------------------------------------------
# plan_runs


def test_plan_runs_empty() -> None:
    assert plan_runs([], CS, 1 * MiB) == []


def test_plan_runs_contiguous_chunks_form_one_run() -> None:
    assert plan_runs([0, 1, 2, 3], CS, 1 * MiB) == [(0, 4 * CS, [0, 1, 2, 3])]
    assert plan_runs([7, 5, 6], CS, 1 * MiB) == [(5 * CS, 3 * CS, [5, 6, 7])]


def test_plan_runs_split_at_max_bytes() -> None:
    runs = plan_runs(list(range(10)), CS, 1 * MiB, max_bytes=4 * CS)
    assert runs == [(0, 4 * CS, [0, 1, 2, 3]), (4 * CS, 4 * CS, [4, 5, 6, 7]),
                    (8 * CS, 2 * CS, [8, 9])]


def test_plan_runs_default_max_bytes_is_one_mib() -> None:
    chunks = list(range(300))
    runs = plan_runs(chunks, CS, 10 * MiB)
    assert [length for _, length, _ in runs] == [1 * MiB, 300 * CS - 1 * MiB]


def test_plan_runs_max_bytes_below_chunk_size() -> None:
    assert plan_runs([0, 1], 64 * KiB, 1 * MiB, max_bytes=4 * KiB) == [
        (0, 64 * KiB, [0]), (64 * KiB, 64 * KiB, [1])]


def test_plan_runs_fill_small_gaps() -> None:
    # gap of 2 chunks (1 and 2) with max_gap=2: read through
    assert plan_runs([0, 3], CS, 1 * MiB) == [(0, 4 * CS, [0, 3])]
    assert plan_runs([0, 3, 5], CS, 1 * MiB, max_gap=2) == [(0, 6 * CS, [0, 3, 5])]
    assert plan_runs([0, 1], CS, 1 * MiB, max_gap=0) == [(0, 2 * CS, [0, 1])]


def test_plan_runs_split_at_big_gaps() -> None:
    assert plan_runs([0, 4], CS, 1 * MiB) == [(0, CS, [0]), (4 * CS, CS, [4])]
    assert plan_runs([0, 2], CS, 1 * MiB, max_gap=0) == [(0, CS, [0]), (2 * CS, CS, [2])]
    assert plan_runs([0, 6], CS, 1 * MiB, max_gap=5) == [(0, 7 * CS, [0, 6])]


def test_plan_runs_gap_counts_against_max_bytes() -> None:
    # [0, 3] spans 4 chunks: too long for a 3-chunk run
    assert plan_runs([0, 3], CS, 1 * MiB, max_bytes=3 * CS) == [
        (0, CS, [0]), (3 * CS, CS, [3])]


def test_plan_runs_ordered_by_first_access() -> None:
    runs = plan_runs([50, 51, 0, 1, 52, 200], CS, 1 * MiB)
    assert runs == [(50 * CS, 3 * CS, [50, 51, 52]), (0, 2 * CS, [0, 1]),
                    (200 * CS, CS, [200])]
    # a run is as early as its earliest chunk
    runs = plan_runs([101, 0, 30, 100], CS, 1 * MiB)  # 101 is first, not 100
    assert [run for _, _, run in runs] == [[100, 101], [0], [30]]
    runs = plan_runs([30, 0, 101, 100], CS, 1 * MiB)
    assert [run for _, _, run in runs] == [[30], [0], [100, 101]]


def test_plan_runs_last_run_clamped_at_layer_size() -> None:
    layer_size = 2 * CS + 100
    assert plan_runs([1, 2], CS, layer_size) == [(CS, CS + 100, [1, 2])]
    assert plan_runs([2, 0], CS, layer_size, max_gap=0) == [(2 * CS, 100, [2]), (0, CS, [0])]
    assert plan_runs([2, 0], CS, layer_size) == [(0, 2 * CS + 100, [0, 2])]


def test_plan_runs_drops_chunks_wholly_past_the_layer() -> None:
    assert plan_runs([5], CS, 2 * CS) == []
    assert plan_runs([0, 5], CS, 2 * CS) == [(0, CS, [0])]


def test_plan_runs_duplicates_keep_first_rank() -> None:
    assert plan_runs([3, 0, 3], CS, 1 * MiB) == [(0, 4 * CS, [0, 3])]


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.integers(0, 400), unique=True, max_size=60),
       shift=st.integers(12, 16), per_run=st.integers(1, 40), max_gap=st.integers(0, 5),
       tail=st.integers(0, 4096))
def test_plan_runs_property(chunks: list[int], shift: int, per_run: int, max_gap: int,
                            tail: int) -> None:
    chunk_size = 1 << shift
    max_bytes = per_run * chunk_size
    layer_size = 380 * chunk_size + tail
    runs = plan_runs(chunks, chunk_size, layer_size, max_bytes, max_gap)
    rank = {c: i for i, c in enumerate(chunks)}
    covered = [c for _, _, run in runs for c in run]
    in_layer = [c for c in chunks if c * chunk_size < layer_size]
    assert sorted(covered) == sorted(in_layer)  # every readable chunk exactly once
    ends = []
    for offset, length, run in runs:
        assert run == sorted(run) and run
        assert 0 < length <= max_bytes
        assert offset == run[0] * chunk_size
        assert offset + length == min((run[-1] + 1) * chunk_size, layer_size)
        assert all(b - a <= max_gap + 1 for a, b in itertools.pairwise(run))
        ends.append((offset, offset + length))
    ends.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ends))  # disjoint
    firsts = [min(rank[c] for c in run) for _, _, run in runs]
    assert firsts == sorted(firsts)


# ---------------------------------------------------------------------------------------
# TraceStore


@pytest.fixture
def trace_dir(tmp_path: Path) -> Path:
    path = tmp_path / "traces"
    path.mkdir()
    return path


@pytest.fixture
def dir_fd(trace_dir: Path) -> Iterator[int]:
    fd = os.open(trace_dir, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def names(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def test_store_save_then_load(trace_dir: Path, dir_fd: int) -> None:
    store = TraceStore(dir_fd, "node1")
    original = sample_trace()
    name = store.save(original)
    assert name == file_name(LAYER.fingerprint, "node1").decode()
    assert names(trace_dir) == [name]
    assert (trace_dir / name).read_bytes() == encode(original)
    assert store.load(LAYER) == ([original], [])
    assert store.load(LAYER) == ([original], [])  # the directory is rescanned
    assert store.load(LayerId(fp(8), LAYER.size, LAYER.mtime_ns)) == ([], [])


def test_store_file_name_uses_the_store_host(trace_dir: Path, dir_fd: int) -> None:
    name = TraceStore(dir_fd, "a/b c").save(trace([], host="other"))
    assert name == f"{PREFIX}.a_b_c.trace"
    assert names(trace_dir) == [name]


def test_store_save_replaces_atomically(trace_dir: Path, dir_fd: int) -> None:
    store = TraceStore(dir_fd, "node1")
    first = trace([boot(1, [(1, 1, 1)] * 50)])
    second = trace([boot(2, [(2, 2, 2)])])
    name = store.save(first)
    old_fd = os.open(trace_dir / name, os.O_RDONLY)
    try:
        store.save(second)
        # the old file was replaced by a rename, not rewritten in place
        assert os.pread(old_fd, 1 << 20, 0) == encode(first)
    finally:
        os.close(old_fd)
    assert names(trace_dir) == [name]  # no temp files left
    assert store.load(LAYER) == ([second], [])


def test_store_save_over_a_stale_temp_file(trace_dir: Path, dir_fd: int) -> None:
    name = file_name(LAYER.fingerprint, "node1")
    stale = b"." + name + f".node1.{os.getpid()}.tmp".encode()
    (trace_dir / os.fsdecode(stale)).write_bytes(b"junk" * 10000)
    store = TraceStore(dir_fd, "node1")
    store.save(sample_trace())
    assert names(trace_dir) == [name.decode()]
    assert store.load(LAYER) == ([sample_trace()], [])


def test_store_failed_encode_writes_nothing(trace_dir: Path, dir_fd: int) -> None:
    huge = trace([boot(1, [(0, 0, 0)] * (MAX_ENTRIES + 1))])
    with pytest.raises(TraceError):
        TraceStore(dir_fd, "node1").save(huge)
    assert names(trace_dir) == []


def test_store_loads_every_host(dir_fd: int) -> None:
    a = trace([boot(1, [(1, 1, 1)])], host="a")
    b = trace([boot(2, [(2, 2, 2)])], host="b")
    TraceStore(dir_fd, "a").save(a)
    TraceStore(dir_fd, "b").save(b)
    good, bad = TraceStore(dir_fd, "a").load(LAYER)
    assert sorted(good, key=lambda t: t.host) == [a, b]
    assert bad == []


def test_store_respects_max_boots_per_file(dir_fd: int) -> None:
    store = TraceStore(dir_fd, "node1")
    boots = [boot(i, [(i, 0, 0)]) for i in range(MAX_BOOTS_PER_FILE * 2)]
    store.save(trace(boots))
    (loaded,), bad = store.load(LAYER)
    assert bad == []
    assert loaded.boots == boots[-MAX_BOOTS_PER_FILE:]


def test_store_load_ignores_other_files(trace_dir: Path, dir_fd: int) -> None:
    valid = encode(sample_trace())
    other_layer = LayerId(fp(55), CS, 0)
    other = encode(trace([], layer=other_layer))
    (trace_dir / f"fp-{other_layer.hex}.h.trace").write_bytes(other)
    (trace_dir / f"fp-{fp(70).hex()}.h.trace").write_bytes(b"garbage")
    (trace_dir / f"{PREFIX}.h.trace.old").write_bytes(b"garbage")
    (trace_dir / f"{PREFIX}.h.trace.1.tmp").write_bytes(b"garbage")
    (trace_dir / f".{PREFIX}.h.trace.123.tmp").write_bytes(b"garbage")
    (trace_dir / f"x{PREFIX}.h.trace").write_bytes(b"garbage")
    (trace_dir / "ino-7.h.trace").write_bytes(b"garbage")  # format 1: only with an inode
    (trace_dir / f"{PREFIX}.h.trace").write_bytes(valid)
    assert TraceStore(dir_fd, "me").load(LAYER) == ([sample_trace()], [])
    assert TraceStore(dir_fd, "me").load(other_layer) == ([trace([], layer=other_layer)], [])


def test_store_load_reports_corrupt_files(trace_dir: Path, dir_fd: int) -> None:
    data = bytearray(encode(sample_trace()))
    data[200] ^= 0x10
    (trace_dir / f"{PREFIX}.bad.trace").write_bytes(bytes(data))
    (trace_dir / f"{PREFIX}.short.trace").write_bytes(b"SCTRACE\0")
    (trace_dir / f"{PREFIX}.empty.trace").write_bytes(b"")
    (trace_dir / f"{PREFIX}.good.trace").write_bytes(encode(sample_trace()))
    good, bad = TraceStore(dir_fd, "me").load(LAYER)
    assert good == [sample_trace()]
    reasons = dict(bad)
    assert set(reasons) == {f"{PREFIX}.bad.trace", f"{PREFIX}.short.trace", f"{PREFIX}.empty.trace"}
    assert "checksum" in reasons[f"{PREFIX}.bad.trace"]
    assert "truncated" in reasons[f"{PREFIX}.short.trace"]
    assert "truncated" in reasons[f"{PREFIX}.empty.trace"]


def test_store_load_reports_a_trace_of_another_layer(trace_dir: Path, dir_fd: int) -> None:
    # renamed or copied by hand: its name says one layer, its content another
    (trace_dir / f"{PREFIX}.h.trace").write_bytes(encode(trace([], layer=LayerId(fp(8), CS, 0))))
    assert TraceStore(dir_fd, "me").load(LAYER) == (
        [], [(f"{PREFIX}.h.trace", f"trace of another layer (fingerprint {fp(8).hex()}, "
              f"expected {LAYER.hex})")])


def test_store_load_reports_an_oversized_file(trace_dir: Path, dir_fd: int) -> None:
    for size in (MAX_FILE_BYTES + 1, 1 << 30):  # sparse; judged by fstat, not by reading
        path = trace_dir / f"{PREFIX}.big.trace"
        with path.open("wb") as f:
            f.truncate(size)
        good, bad = TraceStore(dir_fd, "me").load(LAYER)
        assert good == []
        assert len(bad) == 1 and bad[0][0] == f"{PREFIX}.big.trace"
        assert "oversized" in bad[0][1] and str(size) in bad[0][1]


def test_store_load_accepts_a_file_at_the_size_limit_boundary(trace_dir: Path,
                                                              dir_fd: int) -> None:
    # exactly MAX_FILE_BYTES passes the size check and fails only on content
    path = trace_dir / f"{PREFIX}.limit.trace"
    with path.open("wb") as f:
        f.truncate(MAX_FILE_BYTES)
    (_, reason), = TraceStore(dir_fd, "me").load(LAYER)[1]
    assert "oversized" not in reason


def test_store_load_does_not_follow_symlinks(tmp_path: Path, trace_dir: Path,
                                             dir_fd: int) -> None:
    target = tmp_path / "outside.trace"
    target.write_bytes(encode(sample_trace()))
    (trace_dir / f"{PREFIX}.link.trace").symlink_to(target)
    (trace_dir / f"{PREFIX}.dangling.trace").symlink_to(tmp_path / "missing")
    good, bad = TraceStore(dir_fd, "me").load(LAYER)
    assert good == []
    assert sorted(name for name, _ in bad) == [f"{PREFIX}.dangling.trace", f"{PREFIX}.link.trace"]
    assert all(reason == os.strerror(errno.ELOOP) for _, reason in bad)


def test_store_load_reports_a_directory(trace_dir: Path, dir_fd: int) -> None:
    (trace_dir / f"{PREFIX}.dir.trace").mkdir()
    (trace_dir / f"{PREFIX}.good.trace").write_bytes(encode(sample_trace()))
    assert TraceStore(dir_fd, "me").load(LAYER) == (
        [sample_trace()], [(f"{PREFIX}.dir.trace", "not a regular file")])


@pytest.mark.timeout(10)
def test_store_load_reports_a_fifo_without_blocking(trace_dir: Path, dir_fd: int) -> None:
    os.mkfifo(trace_dir / f"{PREFIX}.fifo.trace")
    assert TraceStore(dir_fd, "me").load(LAYER) == (
        [], [(f"{PREFIX}.fifo.trace", "not a regular file")])


def test_store_load_reports_undecodable_file_names(trace_dir: Path, dir_fd: int) -> None:
    raw = os.path.join(os.fsencode(trace_dir), PREFIX.encode() + b".\xff.trace")
    with open(raw, "wb") as f:
        f.write(b"junk")
    good, bad = TraceStore(dir_fd, "me").load(LAYER)
    assert good == []
    assert [(os.fsencode(name), "truncated" in reason) for name, reason in bad] == [
        (PREFIX.encode() + b".\xff.trace", True)]


# ---------------------------------------------------------------------------------------
# regressions of bugs found and fixed in traces.py


def test_long_unicode_host_round_trips() -> None:
    original = trace([boot(1, [(1, 1, 1)])], host="€" * 22)  # 66 bytes of UTF-8
    decoded = decode(encode(original))
    assert decoded.host.startswith("€" * 21)


def test_encode_never_produces_an_oversized_file() -> None:
    n = MAX_ENTRIES
    boots = [boot(i, [(0, 0, 0)] * (n // 5 + (i < n % 5))) for i in range(5)]
    original = trace(boots, layer=LayerId(fp(7), 1 << 30, 0))
    try:
        data = encode(original)
    except TraceError:
        return  # refusing is fine too
    assert len(data) <= MAX_FILE_BYTES
    assert decode(data) == original


def test_store_failed_rename_leaves_no_temp_file(trace_dir: Path, dir_fd: int) -> None:
    name = file_name(LAYER.fingerprint, "node1").decode()
    (trace_dir / name).mkdir()
    with pytest.raises(OSError):
        TraceStore(dir_fd, "node1").save(sample_trace())
    assert names(trace_dir) == [name]


def test_store_save_with_a_long_unicode_host(dir_fd: int) -> None:
    host = "\U00020000" * 64  # a CJK letter (isalnum), 4 bytes of UTF-8
    assert len(file_name(b"\xff" * 16, host)) <= 255
    TraceStore(dir_fd, host).save(sample_trace())


def test_module_constants_are_consistent() -> None:
    assert traces.VERSION == 2
    assert MAGIC == b"SCTRACE\0"
    assert HEADER.size + TRAILER.size <= MAX_FILE_BYTES
    assert MAX_BOOTS_PER_FILE <= RECENT_BOOTS


# ---------------------------------------------------------------------------------------
# the layer fingerprint: the same on every host for the same bytes


def _file(path: Path, data: bytes) -> int:
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def fingerprint_of(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return traces.fingerprint(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def test_fingerprint_follows_the_bytes_not_the_name_inode_or_mtime(tmp_path: Path) -> None:
    data = os.urandom(8 * MiB)
    a, b = tmp_path / "a.qcow2", tmp_path / "copy.qcow2"
    a.write_bytes(data)
    b.write_bytes(data)  # a copy: another inode, another name, another mtime
    os.utime(b, ns=(1, 1))
    assert os.stat(a).st_ino != os.stat(b).st_ino
    assert fingerprint_of(a) == fingerprint_of(b)
    assert len(fingerprint_of(a)) == 16
    os.link(a, tmp_path / "link.qcow2")
    (tmp_path / "link.qcow2").rename(tmp_path / "renamed.qcow2")
    assert fingerprint_of(tmp_path / "renamed.qcow2") == fingerprint_of(a)


@pytest.mark.parametrize("offset", [0, 100, 64 * KiB - 1, 8 * MiB - 1, 4 * MiB - 1,
                                    2 * MiB - 4 * KiB + 5])
def test_fingerprint_changes_with_the_bytes_it_samples(tmp_path: Path, offset: int) -> None:
    data = bytearray(os.urandom(8 * MiB))
    a = tmp_path / "a"
    a.write_bytes(data)
    before = fingerprint_of(a)
    data[offset] ^= 1
    a.write_bytes(data)
    assert fingerprint_of(a) != before


def test_fingerprint_changes_with_the_size_and_hashes_small_files_whole(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.write_bytes(b"\0" * MiB)
    zeros = fingerprint_of(a)
    a.write_bytes(b"\0" * (MiB + 1))
    assert fingerprint_of(a) != zeros
    data = bytearray(b"\0" * MiB)
    data[300 * KiB] = 1  # a byte no sample of a large file would see
    a.write_bytes(data)
    assert fingerprint_of(a) != zeros


def test_fingerprint_does_not_see_every_byte_of_a_large_file(tmp_path: Path) -> None:
    # The limit the per-chunk digests cover: a byte between the samples.
    data = bytearray(os.urandom(8 * MiB))
    a = tmp_path / "a"
    a.write_bytes(data)
    before = fingerprint_of(a)
    data[3 * MiB + 5 * KiB] ^= 1
    a.write_bytes(data)
    assert fingerprint_of(a) == before


def test_fingerprint_covers_a_qcow2_l1_table(tmp_path: Path) -> None:
    data = bytearray(os.urandom(8 * MiB))
    l1_offset = 3 * MiB + 64 * KiB  # not the head, not a sampled block
    data[0:4] = b"QFI\xfb"
    data[36:48] = struct.pack(">IQ", 4, l1_offset)
    a = tmp_path / "a.qcow2"
    a.write_bytes(data)
    before = fingerprint_of(a)
    data[l1_offset + 17] ^= 1
    a.write_bytes(data)
    assert fingerprint_of(a) != before


def test_same_version_compares_mtime_to_the_precision_both_sides_have() -> None:
    ns = LAYER.mtime_ns
    sshfs_view = LayerId(LAYER.fingerprint, LAYER.size, ns // 10**9 * 10**9)
    assert LAYER.same_version(sshfs_view) and sshfs_view.same_version(LAYER)
    assert not LAYER.same_version(LayerId(LAYER.fingerprint, LAYER.size, ns + 10**9))
    # both precise: a rewrite within the same second is another version
    assert not LAYER.same_version(LayerId(LAYER.fingerprint, LAYER.size, ns + 1))
    assert not sshfs_view.same_version(
        LayerId(LAYER.fingerprint, LAYER.size, sshfs_view.mtime_ns + 10**9))
    assert not LAYER.same_version(LayerId(fp(8), LAYER.size, ns))
    assert not LAYER.same_version(LayerId(LAYER.fingerprint, LAYER.size + 1, ns))
    assert not LayerId(b"", 1, 0).same_version(LayerId(b"", 1, 0))  # format 1: no key


def test_merge_prefers_the_boots_recorded_on_the_layer_as_it_is_now() -> None:
    old_layer = LayerId(LAYER.fingerprint, LAYER.size, LAYER.mtime_ns - 10**9)
    old = trace([boot(1, [(1, 0, 11), (2, 1, 22)])], host="a", layer=old_layer)
    now = trace([boot(2, [(3, 0, 33)])], host="b")
    ws = merge([old, now], LAYER, CS)
    assert ws is not None and ws.current and ws.chunks == [3] and ws.boots == 1
    ws = merge([old], LAYER, CS)  # nothing current: every boot, checked by digests
    assert ws is not None and not ws.current and ws.chunks == [1, 2]


# ---------------------------------------------------------------------------------------
# format 1 (keyed by inode number): read, and migrated once

V1_HEADER = struct.Struct("<8sHHIQQQ64sII")


def encode_v1(ino: int, size: int, mtime_ns: int, host: str, boots: list[Boot],
              chunk_size: int = CS) -> bytes:
    """A format-1 file as scachefs wrote them before fingerprints."""
    entries = [e for b in boots for e in b.chunks]
    body = V1_HEADER.pack(MAGIC, 1, 0, chunk_size, ino, size, mtime_ns,
                          host.encode().ljust(64, b"\0"), len(boots), len(entries))
    body += b"".join(BOOT.pack(b.started, b.duration_ms, b.requests, b.bytes, len(b.chunks))
                     for b in boots)
    body += b"".join(ENTRY.pack(*e) for e in entries)
    return body + TRAILER.pack(xxhash.xxh3_64_intdigest(body))


def test_format_1_files_are_read() -> None:
    boots = [boot(5, [(1, 2, 3)])]
    decoded = decode(encode_v1(42, LAYER.size, 9, "old", boots), ino=42)
    assert decoded.version == 1 and decoded.layer == LayerId(b"", LAYER.size, 9, ino=42)
    assert decoded.host == "old" and decoded.boots == boots
    assert "inode 42, expected 43" in decode_error_v1(encode_v1(42, LAYER.size, 9, "o", []), 43)
    with pytest.raises(TraceError, match="format-1"):
        decode(encode_v1(42, LAYER.size, 9, "old", boots), fingerprint=LAYER.fingerprint)


def decode_error_v1(data: bytes, ino: int) -> str:
    with pytest.raises(TraceError) as info:
        decode(data, ino=ino)
    return str(info.value)


def test_format_1_files_are_migrated_once(trace_dir: Path, dir_fd: int) -> None:
    old_boots = [boot(100, [(1, 0, 11)]), boot(200, [(2, 5, 22)])]
    (trace_dir / "ino-7.hostA.trace").write_bytes(
        encode_v1(7, LAYER.size, LAYER.mtime_ns, "hostA", old_boots))
    # the same inode number, another layer (another size): not this layer's, left alone
    (trace_dir / "ino-7.hostB.trace").write_bytes(
        encode_v1(7, LAYER.size * 2, LAYER.mtime_ns, "hostB", old_boots))
    (trace_dir / "ino-8.hostA.trace").write_bytes(
        encode_v1(8, LAYER.size, LAYER.mtime_ns, "hostA", old_boots))
    store = TraceStore(dir_fd, "me")
    assert store.load(LAYER) == ([], [])  # without an inode number: no migration
    good, bad = store.load(LAYER, "base.qcow2", ino=7)
    assert bad == []
    migrated = TraceFile(LAYER, CS, "hostA", old_boots, "base.qcow2")
    assert good == [migrated]
    assert names(trace_dir) == sorted([f"{PREFIX}.hostA.trace", "ino-7.hostB.trace",
                                       "ino-8.hostA.trace"])
    assert merge(good, LAYER, CS).current  # type: ignore[union-attr]
    # once: the next load reads the format-2 file
    assert store.load(LAYER, "base.qcow2", ino=7) == ([migrated], [])


def test_format_1_boots_join_the_host_file_of_format_2(trace_dir: Path, dir_fd: int) -> None:
    newer = trace([boot(300, [(3, 0, 33)])], host="hostA")
    TraceStore(dir_fd, "hostA").save(newer)
    (trace_dir / "ino-7.hostA.trace").write_bytes(
        encode_v1(7, LAYER.size, LAYER.mtime_ns, "hostA", [boot(100, [(1, 0, 11)])]))
    (good,), bad = TraceStore(dir_fd, "me").load(LAYER, "base.qcow2", ino=7)
    assert bad == [] and [b.started for b in good.boots] == [100, 300]
    assert names(trace_dir) == [f"{PREFIX}.hostA.trace"]
