"""The FUSE session layer on its own: requests in, replies out, over a socket pair.

A SOCK_SEQPACKET pair keeps message boundaries as /dev/fuse does (one request
per read, one reply per write), so the session's decoder, dispatch, error
mapping and encoders are checked byte for byte against hand-built requests,
including malformed ones the kernel should never send. The real kernel talks
to the same code in every integration test.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Sequence

import pytest
import trio

from scachefs.fuse import abi
from scachefs.fuse.ops import Attr, Entry, FuseError, Opened, Operations, Request
from scachefs.fuse.session import DirBuffer, Session, encode_entry

ST = os.stat_result((stat.S_IFREG | 0o644, 1234, 0, 1, 0, 0, 4096, 1, 2, 3, 1.0, 2.0, 3.0,
                     10**9, 2 * 10**9, 3 * 10**9, 4096, 8, 0))
KERNEL_FLAGS = (abi.ASYNC_READ | abi.BIG_WRITES | abi.MAX_PAGES | abi.INIT_EXT
                | abi.PARALLEL_DIROPS | abi.DO_READDIRPLUS | abi.HANDLE_KILLPRIV_V2)


class Toy(Operations):
    """A file system of one file, with handlers that misbehave on request."""

    def __init__(self) -> None:
        self.forgotten: list[tuple[int, int]] = []
        self.reads: list[tuple[int, int, int]] = []

    def init(self, capable: int) -> int:
        return abi.DO_READDIRPLUS | abi.PASSTHROUGH

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        self.forgotten.extend(items)

    def read_now(self, fh: int, offset: int, size: int) -> list[bytes] | None:
        return [b"fa", b"st"] if fh == 7 else None  # pieces of one reply

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        self.reads.append((fh, offset, size))
        await trio.sleep(0)
        return b"slow"

    async def lookup(self, parent: int, name: bytes, req: Request) -> Entry:
        if name == b"bug":
            raise RuntimeError("a bug in a handler")
        if name == b"missing":
            raise FileNotFoundError(errno.ENOENT, "no such file")
        if name == b"denied":
            raise FuseError(errno.EACCES)
        return Entry(42, ST, 1234, 0, 1.5, 2.0)

    async def getattr(self, nodeid: int, fh: int | None, req: Request) -> Attr:
        return Attr(ST, 1234, 0.25)

    async def open(self, nodeid: int, flags: int, req: Request) -> Opened:
        return Opened(5, keep_cache=True)

    async def getxattr(self, nodeid: int, name: bytes, req: Request) -> bytes:
        return b"value"


def request(opcode: int, body: bytes = b"", unique: int = 1, nodeid: int = 1,
            length: int | None = None) -> bytes:
    size = abi.IN_HEADER.size + len(body) if length is None else length
    return abi.IN_HEADER.pack(size, opcode, unique, nodeid, 1000, 1000, 4242, 0, 0) + body


def init_request(minor: int = 45, flags: int = KERNEL_FLAGS) -> bytes:
    return request(abi.INIT, abi.INIT_IN.pack(7, minor, 131072, flags & 0xFFFFFFFF,
                                              flags >> 32), unique=99)


class Kernel:
    """The other end of the session's "device"."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    async def reply(self) -> tuple[int, int, bytes]:
        """(error, unique, payload) of the next reply."""
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(self.sock)
        data = self.sock.recv(1 << 21)
        length, error, unique = abi.OUT_HEADER.unpack_from(data)
        assert length == len(data)
        return -error, unique, data[abi.OUT_HEADER.size:]

    async def ask(self, data: bytes) -> tuple[int, int, bytes]:
        self.send(data)
        return await self.reply()


@pytest.fixture
async def kernel() -> AsyncIterator[tuple[Kernel, Session, Toy]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    toy = Toy()
    session = Session(ours.fileno(), toy)
    k = Kernel(theirs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        err, unique, _ = await k.ask(init_request())
        assert (err, unique) == (0, 99)
        yield k, session, toy
        nursery.cancel_scope.cancel()
    ours.close()
    theirs.close()


@pytest.mark.trio
async def test_init_asks_for_what_the_kernel_offers_and_no_more(
        kernel: tuple[Kernel, Session, Toy]) -> None:
    _, session, _ = kernel
    assert session.proto_minor == 45
    assert session.flags & abi.DO_READDIRPLUS
    assert not session.flags & abi.PASSTHROUGH  # wanted, but this "kernel" did not offer it
    assert not session.passthrough
    assert not session.flags & abi.WRITEBACK_CACHE


@pytest.mark.trio
async def test_init_reply_fields() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        session = Session(ours.fileno(), Toy())
        k = Kernel(theirs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            err, _, payload = await k.ask(init_request(flags=KERNEL_FLAGS | abi.PASSTHROUGH))
            nursery.cancel_scope.cancel()
        assert err == 0 and len(payload) == abi.INIT_OUT.size
        (major, minor, readahead, flags, max_background, _, max_write, time_gran, max_pages,
         _, flags2, stack_depth, _) = abi.INIT_OUT.unpack(payload)
        assert (major, minor, readahead) == (7, 45, 131072)
        assert max_write == 1 << 20 and max_pages == 256 and time_gran == 1
        assert max_background >= 12
        assert flags2 << 32 & abi.PASSTHROUGH and stack_depth == 1
        assert flags & abi.INIT_EXT


@pytest.mark.trio
async def test_a_kernel_too_old_is_refused() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        session = Session(ours.fileno(), Toy())
        k = Kernel(theirs)
        k.send(init_request(minor=26))
        with pytest.raises(ConnectionError, match=r"7\.31 or newer"):
            await session.serve()
        err, _, _ = await k.reply()
        assert err == errno.EPROTO


@pytest.mark.trio
async def test_lookup_reply_is_a_fuse_entry_out(kernel: tuple[Kernel, Session, Toy]) -> None:
    k, _, _ = kernel
    err, unique, payload = await k.ask(request(abi.LOOKUP, b"file\0", unique=5))
    assert (err, unique) == (0, 5)
    assert payload == encode_entry(Entry(42, ST, 1234, 0, 1.5, 2.0))
    nodeid, _, entry_valid, attr_valid, entry_nsec, attr_nsec = \
        abi.ENTRY_OUT_HEAD.unpack_from(payload)
    assert (nodeid, entry_valid, entry_nsec, attr_valid, attr_nsec) == (42, 1, 500_000_000, 2,
                                                                        0)
    attr = abi.ATTR.unpack_from(payload, abi.ENTRY_OUT_HEAD.size)
    assert attr[0] == 1234 and attr[1] == 4096 and attr[9] == stat.S_IFREG | 0o644


@pytest.mark.trio
async def test_errors_map_to_errno_at_one_place_and_a_bug_is_eio(
        kernel: tuple[Kernel, Session, Toy], caplog: pytest.LogCaptureFixture) -> None:
    k, _, _ = kernel
    assert (await k.ask(request(abi.LOOKUP, b"missing\0", unique=2)))[:2] == (errno.ENOENT, 2)
    assert (await k.ask(request(abi.LOOKUP, b"denied\0", unique=3)))[:2] == (errno.EACCES, 3)
    assert (await k.ask(request(abi.LOOKUP, b"bug\0", unique=4)))[:2] == (errno.EIO, 4)
    assert "internal error in _op_lookup" in caplog.text
    assert (await k.ask(request(abi.LOOKUP, b"file\0", unique=6)))[0] == 0  # still serving


@pytest.mark.trio
async def test_unknown_and_unimplemented_opcodes_answer_enosys(
        kernel: tuple[Kernel, Session, Toy]) -> None:
    k, _, _ = kernel
    assert (await k.ask(request(9999, unique=3)))[:2] == (errno.ENOSYS, 3)
    assert (await k.ask(request(abi.BMAP, bytes(16), unique=4)))[:2] == (errno.ENOSYS, 4)
    assert (await k.ask(request(abi.MKDIR, struct.pack("<II", 0o755, 0) + b"d\0",
                                unique=5)))[:2] == (errno.ENOSYS, 5)


@pytest.mark.parametrize("bad", [
    request(abi.LOOKUP, b"no-nul", unique=8),  # a name without its NUL
    request(abi.OPEN, b"\0\0", unique=8),  # open_in too short
    request(abi.READ, bytes(12), unique=8),  # read_in too short
    request(abi.WRITE, abi.WRITE_IN.pack(1, 0, 100, 0, 0, 0, 0) + b"x" * 10, unique=8),
    request(abi.SETATTR, bytes(40), unique=8),
    request(abi.LOOKUP, b"file\0", unique=8, length=1000),  # header length disagrees
], ids=["name-without-nul", "short-open", "short-read", "short-write-data", "short-setattr",
        "bad-length"])
@pytest.mark.trio
async def test_malformed_requests_answer_einval_and_the_session_goes_on(
        kernel: tuple[Kernel, Session, Toy], bad: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    k, _, _ = kernel
    assert (await k.ask(bad))[:2] == (errno.EINVAL, 8)
    assert "malformed FUSE request" in caplog.text
    assert (await k.ask(request(abi.LOOKUP, b"file\0", unique=9)))[:2] == (0, 9)


@pytest.mark.trio
async def test_reads_answered_inline_or_by_a_task(kernel: tuple[Kernel, Session, Toy]) -> None:
    k, session, toy = kernel
    read_in = abi.READ_IN.pack(7, 4096, 4, 0, 0, 0, 0)
    assert await k.ask(request(abi.READ, read_in, unique=11)) == (0, 11, b"fast")
    assert toy.reads == []  # no task, no await: answered on the read loop
    read_in = abi.READ_IN.pack(3, 8192, 4, 0, 0, 0, 0)
    assert await k.ask(request(abi.READ, read_in, unique=12)) == (0, 12, b"slow")
    assert toy.reads == [(3, 8192, 4)]
    assert session.counts["READ"] == 2


@pytest.mark.trio
async def test_forgets_are_inline_and_never_answered(
        kernel: tuple[Kernel, Session, Toy]) -> None:
    k, _, toy = kernel
    k.send(request(abi.FORGET, abi.FORGET_IN.pack(3), nodeid=42))
    batch = abi.BATCH_FORGET_IN.pack(2, 0) + abi.FORGET_ONE.pack(5, 1) + abi.FORGET_ONE.pack(6, 2)
    k.send(request(abi.BATCH_FORGET, batch))
    k.send(request(abi.BATCH_FORGET, abi.BATCH_FORGET_IN.pack(1000, 0)))  # lies: none follow
    assert (await k.ask(request(abi.GETATTR, bytes(16), unique=13)))[:2] == (0, 13)
    assert toy.forgotten == [(42, 3), (5, 1), (6, 2)]


@pytest.mark.trio
async def test_getxattr_size_probe_and_erange(kernel: tuple[Kernel, Session, Toy]) -> None:
    k, _, _ = kernel
    err, _, payload = await k.ask(request(abi.GETXATTR, abi.GETXATTR_IN.pack(0, 0) + b"n\0"))
    assert err == 0 and abi.GETXATTR_OUT.unpack(payload)[0] == 5
    assert (await k.ask(request(abi.GETXATTR, abi.GETXATTR_IN.pack(2, 0) + b"n\0")))[0] == \
        errno.ERANGE
    assert (await k.ask(request(abi.GETXATTR, abi.GETXATTR_IN.pack(64, 0) + b"n\0")))[2] == \
        b"value"


@pytest.mark.trio
async def test_open_reply_flags(kernel: tuple[Kernel, Session, Toy]) -> None:
    k, session, _ = kernel
    err, _, payload = await k.ask(request(abi.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0)))
    assert err == 0
    assert abi.OPEN_OUT.unpack(payload) == (5, abi.FOPEN_KEEP_CACHE, 0)
    out = session._open_out(Opened(9, keep_cache=True, backing_id=3, noflush=True))
    assert abi.OPEN_OUT.unpack(out) == (9, abi.FOPEN_PASSTHROUGH | abi.FOPEN_NOFLUSH, 3)


def test_dirbuffer_packs_aligned_entries_until_full() -> None:
    out = DirBuffer(64, plus=False)
    assert out.add(b"abc", 1, 77, stat.S_IFDIR)  # 24 + 3 -> 32 bytes
    assert out.add(b"x" * 8, 2, 78, stat.S_IFREG)  # 24 + 8 = 32 bytes: exactly full
    assert not out.add(b"y", 3, 79, stat.S_IFREG)
    data = out.payload()
    assert len(data) == 64  # two entries, the second one as packed as the first
    assert abi.DIRENT_HEAD.unpack_from(data) == (77, 1, 3, stat.S_IFDIR >> 12)
    assert data[24:27] == b"abc" and data[27:32] == bytes(5)
    assert abi.DIRENT_HEAD.unpack_from(data, 32) == (78, 2, 8, stat.S_IFREG >> 12)
    assert data[56:64] == b"x" * 8
    plus = DirBuffer(4096, plus=True)
    assert plus.add(b"f", 1, 1234, ST.st_mode, Entry(42, ST, 1234))
    assert plus.add(b"g", 2, 55, ST.st_mode)  # no entry: nodeid 0, no lookup
    data = plus.payload()
    assert abi.ENTRY_OUT_HEAD.unpack_from(data)[0] == 42
    second = 128 + 32
    assert abi.ENTRY_OUT_HEAD.unpack_from(data, second)[0] == 0
    assert len(data) == 2 * (128 + 32)


@pytest.mark.trio
async def test_debug_logs_every_request_with_its_answer(
        caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        caplog.set_level(logging.DEBUG, logger="scachefs.fuse.session")
        session = Session(ours.fileno(), Toy())
        k = Kernel(theirs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            await k.ask(init_request())
            assert (await k.ask(request(abi.LOOKUP, b"missing\0", unique=21)))[0] == \
                errno.ENOENT
            await k.ask(request(abi.GETATTR, bytes(16), unique=22, nodeid=42))
            read_in = abi.READ_IN.pack(7, 0, 4, 0, 0, 0, 0)
            await k.ask(request(abi.READ, read_in, unique=23))  # answered inline
            k.send(request(abi.FORGET, abi.FORGET_IN.pack(1), nodeid=42, unique=24))
            await k.ask(request(abi.GETATTR, bytes(16), unique=25))
            nursery.cancel_scope.cancel()
    text = caplog.text
    assert "LOOKUP unique=21 nodeid=1 uid=1000 gid=1000 pid=4242 -> ENOENT" in text, text
    assert "GETATTR unique=22 nodeid=42 uid=1000 gid=1000 pid=4242 -> OK, 104 bytes" in text
    assert "READ unique=23 nodeid=1 uid=1000 gid=1000 pid=4242 -> OK, 4 bytes" in text
    assert "FORGET unique=24 nodeid=42 uid=1000 gid=1000 pid=4242: no reply" in text
    assert not session._pending  # every answer found its request


@pytest.mark.trio
async def test_without_debug_requests_are_not_logged_and_cost_no_check(
        caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        caplog.set_level(logging.INFO, logger="scachefs.fuse.session")
        session = Session(ours.fileno(), Toy())
        assert session._dispatch_one == session._dispatch
        assert session._write == session._write_reply
        k = Kernel(theirs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            await k.ask(init_request())
            await k.ask(request(abi.LOOKUP, b"missing\0", unique=21))
            nursery.cancel_scope.cancel()
    assert "unique=21" not in caplog.text
