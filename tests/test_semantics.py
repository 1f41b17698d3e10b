"""The store's answers through the mount: the same operation, as the same user, on a store
file and on the same kind of file through an ``allow_other`` mount, gives the same result.

Each test covers a class, not one case: every time field and special value, every
signed offset, every xattr namespace on every kind of file, writes through O_APPEND
handles. ``tests/sameop.py`` runs the operations as the given user and reports each
errno and value, once on the store and once through the mount.
"""

from __future__ import annotations

import calendar
import json
import mmap
import os
import pwd
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scachefs import arena, traces
from scachefs.traces import Boot, LayerId, TraceFile
from tests.conftest import MountFactory
from tests.mounting import USER, Mount, run
from tests.test_qemu_passthrough import make_base, qemu_io
from tests.test_shadow_cache import layer_stats, overlay

PYTHON = "/usr/bin/python3"  # the test user cannot reach the venv under /root
SAMEOP = str(Path(__file__).with_name("sameop.py"))
NS = 1_000_000_000


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """pytest's tmp_path is private to root; the test user must reach store and mount."""
    path = Path(tempfile.mkdtemp(prefix="scachefs-sem-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store(public_dir: Path) -> Path:
    (public_dir / "store").mkdir(mode=0o755)
    return public_dir / "store"


@pytest.fixture
def mnt(public_dir: Path) -> Path:
    (public_dir / "mnt").mkdir(mode=0o755)
    return public_dir / "mnt"


def ops(user: str | None, items: list[tuple[str | int | os.PathLike[str], ...]]
        ) -> list[dict[str, object]]:
    """Run sameop.py operations one after the other, in one process, as ``user``."""
    payload = json.dumps([[os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in item]
                          for item in items]).encode()
    out = run(PYTHON, SAMEOP, "--batch", user=user, input=payload).stdout
    results: list[dict[str, object]] = json.loads(out)
    return results


def ns_at(year: int, month: int = 1, day: int = 1, extra_ns: int = 0) -> int:
    return calendar.timegm((year, month, day, 0, 0, 0)) * NS + extra_ns


# ----------------------------------------------------------------------------- times
START = ns_at(2020, 6, 1, 500_000_000)  # every file's atime and mtime before the operation
# (atime, mtime) as sameop.utimens takes them: nanoseconds, NOW, OMIT; NULL: utimes(NULL)
TIME_CASES = {
    "touch": ("NULL", "NULL"),
    "now-both": ("NOW", "NOW"),
    "now-atime-omit-mtime": ("NOW", "OMIT"),
    "omit-atime-now-mtime": ("OMIT", "NOW"),
    "omit-both": ("OMIT", "OMIT"),
    "pre-1970": (str(ns_at(1960, 1, 1, 123_456_789)), str(-1)),  # and 1 ns before 1970
    "1901": (str(ns_at(1901, 12, 14)), str(ns_at(1969, 12, 31, 999_999_999))),
    "epoch": ("0", "0"),
    # The numbers UTIME_NOW and UTIME_OMIT mean as nanoseconds are plain times here.
    "utime-now-as-a-time": (str((1 << 30) - 1), str((1 << 30) - 2)),
    "far-future": (str(ns_at(2100, 1, 1, 1)), str(ns_at(2400, 2, 29, 999_999_999))),
    "past-2038": (str(ns_at(2038, 1, 19) + 3 * 3600 * NS + 15 * 60 * NS + 8 * NS),
                  str(ns_at(2106, 2, 7, 7))),
    "nanoseconds": ("1700000000999999999", "1700000000000000001"),
    "explicit-atime-omit-mtime": (str(ns_at(1950, 5, 5, 5)), "OMIT"),
    "omit-atime-now-explicit": ("OMIT", str(ns_at(1999, 12, 31, 999_999_999))),
    "explicit-atime-now-mtime": (str(ns_at(1969, 7, 20, 1)), "NOW"),
}
# Who calls: the file's owner and mode decide what the store allows (explicit times: the
# owner only; NOW: also a writer; others: neither).
CALLERS = {"root": (None, 0o644, False), "owner": (USER, 0o644, True),
           "writer": (USER, 0o666, False), "reader": (USER, 0o644, False)}


def _new_file(path: Path, mode: int, user_owns: bool) -> None:
    path.write_bytes(b"data")
    path.chmod(mode)
    if user_owns:
        pw = pwd.getpwnam(USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    os.utime(path, ns=(START, START))


def _check_times(name: str, case: tuple[str, str], refused: bool, before: int, after: int,
                 direct: list[int], through: list[int]) -> None:
    """``direct`` and ``through``: (atime, mtime) of the store files after the operation."""
    for slot, spec in enumerate(case):
        label = f"{name}: {'am'[slot]}time"
        if refused:
            assert direct[slot] == through[slot] == START, (label, through, direct)
        elif spec in ("NOW", "NULL"):
            # The store's clock (coarse: up to a tick behind the fine clock).
            assert before - 50_000_000 <= direct[slot] <= after, (label, direct)
            assert before - 50_000_000 <= through[slot] <= after, (label, through)
        else:
            assert through[slot] == direct[slot], (label, through, direct)


# futimens needs a descriptor open for writing, which a reader cannot have.
_TIME_RUNS = [pytest.param(caller, use_fd, id=f"{'futimens' if use_fd else 'utimensat'}-{caller}")
              for use_fd in (False, True) for caller in CALLERS
              if not (use_fd and caller == "reader")]


@pytest.mark.parametrize("caller, use_fd", _TIME_RUNS)
def test_times_are_set_as_the_store_sets_them(store: Path, mnt: Path, mounted: Mount,
                                              user: pwd.struct_passwd, caller: str,
                                              use_fd: bool) -> None:
    """Every special value and range of utimensat, as each kind of caller."""
    who, mode, user_owns = CALLERS[caller]
    for name, case in TIME_CASES.items():
        if use_fd and case[0] == "NULL":
            continue
        _new_file(store / f"direct-{name}", mode, user_owns)
        _new_file(store / f"through-{name}", mode, user_owns)
    cases = {name: case for name, case in TIME_CASES.items()
             if not (use_fd and case[0] == "NULL")}
    call = "futimens" if use_fd else "utimens"
    before = time.time_ns()
    directs = ops(who, [(call, store / f"direct-{name}", *case) for name, case in cases.items()])
    throughs = ops(who, [(call, mnt / f"through-{name}", *case) for name, case in cases.items()])
    after = time.time_ns()
    outcomes = set()
    for (name, case), direct, through in zip(cases.items(), directs, throughs, strict=True):
        assert through["errno"] == direct["errno"], (name, through, direct)
        outcomes.add(direct["errno"])
        st_direct = os.stat(store / f"direct-{name}")
        st_store = os.stat(store / f"through-{name}")
        _check_times(name, case, direct["errno"] != 0, before, after,
                     [st_direct.st_atime_ns, st_direct.st_mtime_ns],
                     [st_store.st_atime_ns, st_store.st_mtime_ns])
        # What the mount reports is what the store holds, to the nanosecond.
        st_mnt = os.stat(mnt / f"through-{name}")
        assert (st_mnt.st_atime_ns, st_mnt.st_mtime_ns, st_mnt.st_ctime_ns) == (
            st_store.st_atime_ns, st_store.st_mtime_ns, st_store.st_ctime_ns), name
    # Not vacuous: the owner may do everything, the others only some of it.
    assert outcomes == ({0} if who is None or user_owns else {0, "EPERM"} if use_fd
                        or caller == "writer" else {0, "EPERM", "EACCES"}), outcomes


def test_touch_sets_the_stores_time_not_1970(store: Path, mnt: Path, mounted: Mount,
                                             user: pwd.struct_passwd) -> None:
    """touch(1), as the owner and as a writer who does not own the file."""
    (store / "f").write_bytes(b"")
    os.utime(store / "f", ns=(START, START))
    before = time.time_ns() - 50_000_000
    run("touch", mnt / "f")
    run("touch", mnt / "new")
    st = os.stat(store / "f")
    assert st.st_atime_ns >= before and st.st_mtime_ns >= before, st
    assert os.stat(store / "new").st_mtime_ns >= before
    (store / "g").write_bytes(b"")
    (store / "g").chmod(0o666)
    os.utime(store / "g", ns=(START, START))
    run("touch", mnt / "g", user=USER)  # a writer may set "now"...
    assert os.stat(store / "g").st_mtime_ns >= before
    result = run("touch", "-d", "2001-01-01", mnt / "g", user=USER, check=False)
    assert result.returncode != 0 and "Operation not permitted" in result.stderr  # ...only
    run("touch", "-d", "1960-01-01 12:00:00.25", mnt / "f")
    assert os.stat(store / "f").st_mtime_ns == ns_at(1960, 1, 1, (12 * 3600) * NS + NS // 4)


def test_store_times_before_1970_and_after_2038_are_shown(store: Path, mnt: Path,
                                                           mounted: Mount) -> None:
    """Files the store already holds with such times: stat, ls and readdir work."""
    times = {"old": (ns_at(1960, 1, 1, 1), ns_at(1901, 12, 14, 999_999_999)),
             "minus-one-ns": (-1, -NS),
             "future": (ns_at(2300, 1, 1, 7), ns_at(2446, 5, 10))}
    (store / "dir").mkdir()
    for name, (atime, mtime) in times.items():
        for where in (store, store / "dir"):
            (where / name).write_bytes(b"x")
            os.utime(where / name, ns=(atime, mtime))
    os.utime(store / "dir", ns=times["old"])
    listing = run("ls", "-la", "--full-time", mnt / "dir").stdout
    assert "1901-12-14" in listing and "2446-05-10" in listing, listing
    for name, (atime, mtime) in times.items():
        for sub in ("", "dir"):
            st_mnt = os.stat(mnt / sub / name)
            st_store = os.stat(store / sub / name)
            assert (st_mnt.st_atime_ns, st_mnt.st_mtime_ns) == (atime, mtime), name
            assert st_mnt.st_ctime_ns == st_store.st_ctime_ns
    assert os.stat(mnt / "dir").st_mtime_ns == times["old"][1]  # (ls moved its atime)
    assert sorted(e.name for e in os.scandir(mnt / "dir")) == sorted(times)


def test_layer_times_before_1970_and_touch(store: Path, mnt: Path, mounted: Mount) -> None:
    """A base with a 1960 mtime is cached like any other; a touched base gets the store's
    new mtime as its identity, never 1970."""
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    old = ns_at(1960, 1, 1, 42)
    os.utime(store / "base.qcow2", ns=(old, old))
    qemu_io(mnt / "vm.qcow2", "read -P 0xa1 0 1M", cache="none")
    layer = layer_stats(mnt, "base.qcow2")
    assert int(layer["identity"].split(":")[3]) == old and layer["resident_bytes"] > 0, layer
    before = time.time_ns() - 50_000_000
    run("touch", mnt / "base.qcow2")
    mtime = os.stat(store / "base.qcow2").st_mtime_ns
    assert before <= mtime <= time.time_ns(), mtime
    assert os.stat(mnt / "base.qcow2").st_mtime_ns == mtime
    qemu_io(mnt / "vm.qcow2", "read -P 0xa1 0 1M", cache="none")
    assert int(layer_stats(mnt, "base.qcow2")["identity"].split(":")[3]) == mtime


def test_trace_and_arena_records_keep_times_before_1970() -> None:
    """The two on-disk records that carry a layer's mtime store it signed."""
    layer = LayerId(b"\x01" * 16, size=1 << 20, mtime_ns=ns_at(1960, 1, 1, 5))
    data = traces.encode(TraceFile(layer, 65536, "host", [Boot(0, 1, 1, 4096, [(0, 0, 0)])]))
    assert traces.decode(data).layer.mtime_ns == layer.mtime_ns
    fd = arena.create_memfd(65536, 4 * 65536)
    try:
        first = arena.Arena(fd, 65536, 4)
        identity = (1, 2, 1 << 20, -1)
        first.put(identity, 0, b"x" * 100)
        second = arena.Arena(fd, 65536, 4)
        assert identity in second.scan()
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- offsets
# (operation, arguments after the path) of sameop.py: negative, huge and ordinary
# offsets and lengths of every request whose offset is signed in the kernel (loff_t).
BIG = 1 << 62
OFFSET_CASES = [
    *(("lseek", str(off), whence) for whence in ("SEEK_DATA", "SEEK_HOLE")
      for off in (-1, -4096, -(1 << 63), 0, 4096, 1 << 20, (2 << 20) - 1, 2 << 20, BIG)),
    # The kernel answers these itself, against FUSE's own size limit (not the store's:
    # FUSE has no way to tell it), so offsets beyond the store's limit are left out.
    *(("lseek", str(off), whence) for whence in ("SEEK_SET", "SEEK_CUR", "SEEK_END")
      for off in (-1, -(3 << 20), 5, 1 << 40)),
    *(("pread", str(off), "4096") for off in (-1, -(1 << 63), 0, (2 << 20) - 10, BIG,
                                               (1 << 63) - 4096)),
    *(("pwrite", str(off), "10") for off in (-1, -(1 << 63), 0, (2 << 20) - 5, BIG)),
    *(("fallocate", str(mode), str(off), str(length))
      for mode in (0, 1, 3)  # allocate, keep size, punch hole (with keep size)
      for off, length in ((-1, 4096), (0, -1), (0, 0), (4096, 8192), (BIG, 4096),
                          (1 << 20, -(1 << 63)))),
]
COPY_CASES = [(str(a), str(b), str(n)) for a, b, n in (
    (-1, 0, 10), (0, -1, 10), (0, 0, 4096), (1 << 20, 100, 8192), (BIG, 0, 10),
    (0, BIG, 10), ((2 << 20) - 100, 0, 4096))]


def _sparse(path: Path) -> None:
    """2 MiB with data at 0 and at 1 MiB, holes between."""
    with open(path, "wb") as f:
        f.write(b"a" * 4096)
        f.seek(1 << 20)
        f.write(b"b" * 4096)
        f.truncate(2 << 20)


@pytest.mark.parametrize("passthrough", ["auto", "off"])
def test_offsets_and_lengths_answer_the_stores_errno(store: Path, mnt: Path,
                                                      mount_factory: MountFactory,
                                                      passthrough: str) -> None:
    """lseek, pread, pwrite, fallocate and copy_file_range with negative, huge and
    ordinary offsets: the same value or errno as on the store, the same bytes after."""
    for i in range(len(OFFSET_CASES)):
        _sparse(store / f"d{i}")
        _sparse(store / f"t{i}")
    for i in range(len(COPY_CASES)):
        for name in (f"cd{i}", f"ct{i}", f"cd{i}.src", f"ct{i}.src"):
            _sparse(store / name)
    mount_factory(store, mnt, "allow_other", f"passthrough={passthrough}")
    outcomes = set()
    cases = [*OFFSET_CASES, *(("copy_range", *args) for args in COPY_CASES)]

    def batch(where: Path, prefix: str) -> list[dict[str, object]]:
        items = [(name, where / f"{prefix}{i}", *args)
                 for i, (name, *args) in enumerate(OFFSET_CASES)]
        items += [("copy_range", where / f"c{prefix}{i}.src", where / f"c{prefix}{i}", *args)
                  for i, args in enumerate(COPY_CASES)]
        return ops(None, items)

    for case, direct, through in zip(cases, batch(store, "d"), batch(mnt, "t"), strict=True):
        assert through == direct, (case, through, direct)
        outcomes.add(direct["errno"])
    for i, case in enumerate(OFFSET_CASES):
        assert (store / f"t{i}").read_bytes() == (store / f"d{i}").read_bytes(), case
    for i, args in enumerate(COPY_CASES):
        assert (store / f"ct{i}").read_bytes() == (store / f"cd{i}").read_bytes(), args
    assert {0, "ENXIO", "EINVAL", "EFBIG"} <= outcomes, outcomes


# ---------------------------------------------------------------------------- append
def _write_through_append_fd(path: Path, mnt: Path | None = None) -> None:
    """mmap-write offset 0 of an O_APPEND descriptor, then append with write(2); with
    ``mnt``, the daemon is upgraded (a successor takes the handle over) in between."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        if mnt is not None:
            out = run(sys.executable, "-m", "scachefs.stat", "--upgrade", mnt).stdout
            assert "upgraded in" in out, out
        with mmap.mmap(fd, 8192, mmap.MAP_SHARED) as m:
            m[0:5] = b"HELLO"
            m[8190:8192] = b"!!"
            m.flush()
        os.write(fd, b"tail")
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["passthrough-off", "cached-layer", "after-upgrade"])
def test_mmap_writes_of_an_append_handle_land_where_written(
        store: Path, mnt: Path, mount_factory: MountFactory, how: str) -> None:
    """Files the daemon serves itself (passthrough off; a writer of a layer the cache
    holds): its store descriptor must not append every WRITE."""
    for name in ("direct", "through"):
        (store / name).write_bytes(bytes(8192))
        os.utime(store / name, (1, 1))  # a settled identity: the layer gets cached
    mount_factory(store, mnt, "allow_other",
                  *(["passthrough=off"] if how != "cached-layer" else ["layers=all"]))
    if how == "cached-layer":
        assert (mnt / "through").read_bytes() == bytes(8192)  # cached: writers are ours
    _write_through_append_fd(store / "direct")
    _write_through_append_fd(mnt / "through", mnt if how == "after-upgrade" else None)
    expected = b"HELLO" + bytes(8185) + b"!!tail"
    assert (store / "direct").read_bytes() == expected
    assert (store / "through").read_bytes() == expected
    assert os.stat(store / "through").st_mode == os.stat(store / "direct").st_mode
    assert (mnt / "through").read_bytes() == expected


# ---------------------------------------------------------------------------- xattrs
def _xattr_script(link: Path, target: Path) -> list[tuple[str | Path, ...]]:
    """Every xattr call on a symlink itself (and, following it, on its target)."""
    script: list[tuple[str | Path, ...]] = []
    for space in ("trusted", "security", "user"):
        name = f"{space}.sem"
        script += [("setxattr", link, name, "v1"), ("getxattr", link, name),
                   ("listxattr", link), ("setxattr", link, name, "second value"),
                   ("getxattr", link, name), ("getxattr", target, name),
                   ("removexattr", link, name), ("removexattr", link, name),
                   ("getxattr", link, name), ("setxattr", link, name, "kept")]
    script += [("listxattr", link), ("listxattr", target),
               ("setxattr", link, "user.on-target", "t", "1"),  # follows the link
               ("getxattr", link, "user.on-target", "1"), ("listxattr", link, "1"),
               ("listxattr", link), ("getxattr", link, "trusted.absent")]
    return script


@pytest.mark.parametrize("kind", ["symlink", "file", "directory"])
def test_xattrs_are_the_stores(store: Path, mnt: Path, mounted: Mount,
                               user: pwd.struct_passwd, kind: str) -> None:
    """Every namespace as root, as the owner and as another user. On a symlink trusted.*
    and security.* work as on the store and user.* is refused as the store refuses it;
    the target is touched only when the caller follows the link. trusted.* is listed
    only to CAP_SYS_ADMIN."""
    for prefix in ("d", "t"):
        (store / f"{prefix}-target").write_bytes(b"")
        (store / f"{prefix}-target").chmod(0o666)
        for name in (f"{prefix}-link", f"{prefix}-user-link"):
            if kind == "symlink":
                os.symlink(f"{prefix}-target", store / name)
            elif kind == "file":
                (store / name).write_bytes(b"")
                (store / name).chmod(0o666)
            else:
                (store / name).mkdir(0o777)
                (store / name).chmod(0o777)
        os.chown(store / f"{prefix}-user-link", user.pw_uid, user.pw_gid,
                 follow_symlinks=False)
    outcomes = set()
    for who, link in ((None, "link"), (USER, "link"), (USER, "user-link"), (None, "user-link")):
        direct = ops(who, _xattr_script(store / f"d-{link}", store / "d-target"))
        through = ops(who, _xattr_script(mnt / f"t-{link}", mnt / "t-target"))
        for step, d, t in zip(_xattr_script(Path(link), Path("target")), direct, through,
                              strict=True):
            assert t == d, (who, step, t, d)
            outcomes.add((who, step[0], d["errno"]))
    assert {(None, "setxattr", 0), (USER, "setxattr", "EPERM"), (None, "getxattr", 0),
            (None, "removexattr", 0)} <= outcomes, outcomes
    assert ((None, "setxattr", "EPERM") in outcomes) == (kind == "symlink")
    assert os.listxattr(store / "t-link", follow_symlinks=False) == os.listxattr(
        store / "d-link", follow_symlinks=False)
    assert "trusted.sem" in os.listxattr(store / "t-link", follow_symlinks=False)
    if kind == "symlink":
        assert "trusted.sem" not in os.listxattr(store / "t-target")
