"""Stale bytes, a dying daemon, lost traces: the review's seven bugs, each on a live mount.

Every test here drives a real mount the way a user would and failed on the code
before its fix (issue 10); docs/reliability.md lists them.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MountFactory
from tests.mounting import daemon_fd_targets, daemon_fds, run, settle
from tests.test_boot_traces import wait_for
from tests.test_shadow_cache import layer_stats, overlay, stats

MiB = 1 << 20
COMMAND = "user.scachefs.command"


class DirectReader:
    """An O_DIRECT reader of a file under the mount (like qemu with cache=none)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self.buf = mmap.mmap(-1, 1 << 20)  # page aligned, as O_DIRECT needs

    def read(self, offset: int, size: int = 4096) -> bytes:
        view = memoryview(self.buf)[:size]
        n = os.preadv(self.fd, [view], offset)
        return bytes(view[:n])

    def close(self) -> None:
        os.close(self.fd)
        self.buf.close()


def make_layer(store: Path, name: str = "base.raw", size: int = 4 * MiB,
               fill: int = 0xA1) -> Path:
    """A raw file and a qcow2 overlay on it in the store, so the file is a backing layer."""
    path = store / name
    path.write_bytes(bytes([fill]) * size)
    overlay(store, f"vm-on-{name}.qcow2", name, fmt="raw")
    return settle(path)


def wait_scanned(mnt: Path, path: str, timeout: float = 20) -> None:
    """Wait until the mount-time scan knows ``path`` as a backing layer."""
    deadline = time.monotonic() + timeout
    while not any(la["path"] == path for la in stats(mnt)["layers"]):
        assert time.monotonic() < deadline, stats(mnt)
        time.sleep(0.05)


def deleted_fds(pid: int) -> list[str]:
    """Descriptors the daemon reads deleted files through (O_PATH ones only name an inode
    the kernel still holds, and go when it forgets it)."""
    out = []
    for fd, target in daemon_fd_targets(pid).items():
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        flags = int(next(line.split()[1] for line in info.splitlines()
                         if line.startswith("flags:")), 8)
        if (target.endswith(" (deleted)") and not flags & 0o10000000  # O_PATH
                and not target.startswith("/memfd:")):  # the daemon's own state
            out.append(target)
    return out


def attached(mnt: Path) -> list[dict[str, Any]]:
    return [la for la in stats(mnt)["layers"] if la["attached"]]


# 1 ------------------------------------------------------------------------------------
def test_a_file_created_through_the_mount_counts_as_a_writer(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    mount_factory(store, mnt, "allow_other")
    created = os.open(mnt / "base.raw", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        os.pwrite(created, b"A" * MiB, 0)
        os.fsync(created)
        # An overlay on it, opened: base.raw becomes a backing layer.
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
            mnt / "vm.qcow2")
        run("qemu-io", "-r", "-c", "read -P 0x41 0 4k", mnt / "vm.qcow2")
        reader = DirectReader(mnt / "base.raw")
        try:
            assert reader.read(0) == b"A" * 4096
            os.pwrite(created, b"B" * MiB, 0)
            os.fsync(created)
            assert (store / "base.raw").read_bytes()[:4] == b"BBBB"
            assert reader.read(0) == b"B" * 4096  # never the bytes it read before
        finally:
            reader.close()
    finally:
        os.close(created)


def test_a_writer_stays_counted_when_the_create_handle_closes_first(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    mount_factory(store, mnt, "allow_other")
    created = os.open(mnt / "base.raw", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    os.pwrite(created, b"A" * MiB, 0)
    os.fsync(created)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
        mnt / "vm.qcow2")
    run("qemu-io", "-r", "-c", "read -P 0x41 0 4k", mnt / "vm.qcow2")
    writer = os.open(mnt / "base.raw", os.O_RDWR)
    os.close(created)  # the writer `writer` is still open
    try:
        reader = DirectReader(mnt / "base.raw")
        try:
            assert reader.read(0) == b"A" * 4096
            os.pwrite(writer, b"B" * MiB, 0)
            os.fsync(writer)
            assert reader.read(0) == b"B" * 4096
        finally:
            reader.close()
        base = layer_stats(mnt, "base.raw")
        assert not base["attached"], base  # read from the store while a writer is open
    finally:
        os.close(writer)


# 2 ------------------------------------------------------------------------------------
def test_warm_after_a_change_on_the_store_never_serves_old_pages(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_layer(store, fill=ord("A"))
    mount_factory(store, mnt, "allow_other")  # attr_timeout is 10 s: well inside it
    wait_scanned(mnt, "base.raw")
    assert buffered_read(mnt / "base.raw") == b"A" * 4096  # into the kernel's page cache
    first = layer_stats(mnt, "base.raw")["identity"]
    # Rewritten in place on the store: same inode and size, a new mtime.
    with open(store / "base.raw", "r+b") as f:
        f.write(b"B" * (4 * MiB))
    st = os.stat(store / "base.raw")
    os.utime(store / "base.raw", ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    os.setxattr(mnt, COMMAND, json.dumps({"action": "warm", "path": "base.raw"}).encode())
    wait_for(mnt, "base.raw", lambda la: la.get("identity") not in (None, first))
    assert buffered_read(mnt / "base.raw") == b"B" * 4096


def buffered_read(path: Path) -> bytes:
    """open + read, nothing else: no fstat that would make the kernel refresh attributes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


# 3 ------------------------------------------------------------------------------------
def test_a_layer_replaced_by_rename_is_let_go(store: Path, mnt: Path,
                                              mount_factory: MountFactory) -> None:
    make_layer(store, size=8 * MiB)
    mount = mount_factory(store, mnt, "allow_other")
    for i in range(10):
        pattern = 0x10 + i
        run("qemu-io", "--cache=none", "-r", "-c", "read 0 8M", mnt / "vm-on-base.raw.qcow2")
        (mnt / "base.new").write_bytes(bytes([pattern]) * (8 * MiB))
        run("mv", mnt / "base.new", mnt / "base.raw")
        out = run("qemu-io", "--cache=none", "-r", "-c", f"read -P {pattern:#x} 0 8M",
                  mnt / "vm-on-base.raw.qcow2").stdout
        assert "verification failed" not in out, out
    assert deleted_fds(mount.pid) == []
    assert len(attached(mnt)) <= 1, attached(mnt)


def test_a_layer_deleted_on_the_store_is_let_go(store: Path, mnt: Path,
                                                mount_factory: MountFactory) -> None:
    make_layer(store, size=8 * MiB)
    mount = mount_factory(store, mnt, "allow_other")
    run("qemu-io", "--cache=none", "-r", "-c", "read -P 0xa1 0 8M", mnt / "vm-on-base.raw.qcow2")
    assert layer_stats(mnt, "base.raw")["resident_bytes"] > 0
    (store / "base.raw").unlink()  # behind the mount's back
    deadline = time.monotonic() + 15
    while deleted_fds(mount.pid):
        assert time.monotonic() < deadline, deleted_fds(mount.pid)
        time.sleep(0.2)
    assert attached(mnt) == []
    assert stats(mnt)["cache"]["used_bytes"] == 0
    # The kernel was told to forget the name: the inode goes, and its O_PATH descriptor.
    while any(t.endswith("/base.raw (deleted)") for t in daemon_fd_targets(mount.pid).values()):
        assert time.monotonic() < deadline + 10, daemon_fd_targets(mount.pid).values()
        time.sleep(0.2)


# 4, 5 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["\ud800", "a\u0000b", 7, ""], ids=["surrogate", "nul", "int",
                                                                      "empty"])
def test_a_bad_warm_path_is_refused_and_the_daemon_lives(
        store: Path, mnt: Path, mount_factory: MountFactory, path: object) -> None:
    make_layer(store)
    mount = mount_factory(store, mnt, "allow_other", allow=("refused",))
    request = json.dumps({"action": "warm", "path": path}).encode()
    with pytest.raises(OSError) as info:
        os.setxattr(mnt, COMMAND, request)
    assert info.value.errno == errno.EINVAL
    time.sleep(0.5)
    assert mount.proc.poll() is None
    assert (mnt / "base.raw").read_bytes()[:4] == b"\xa1" * 4
    assert "refused" in mount.log()


def test_warm_of_a_fifo_is_refused_without_tying_up_a_worker(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_layer(store)
    os.mkfifo(store / "fifo")
    mount = mount_factory(store, mnt, "allow_other", "threads=2", allow=("refused",))
    for _ in range(3):
        with pytest.raises(OSError) as info:
            os.setxattr(mnt, COMMAND, b'{"action": "warm", "path": "fifo"}')
        assert info.value.errno == errno.EINVAL
    # Every worker is still free: an unrelated read completes at once.
    result = subprocess.run(["cat", str(mnt / "base.raw")], capture_output=True, timeout=10,
                            check=True)
    assert result.stdout[:2] == b"\xa1\xa1"
    assert mount.proc.poll() is None


# 6 ------------------------------------------------------------------------------------
def test_a_boot_that_read_past_the_end_keeps_its_trace(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    size = 3 * MiB + 100
    make_layer(store, size=size)
    mount = mount_factory(store, mnt, "allow_other")
    wait_scanned(mnt, "base.raw")
    reader = DirectReader(mnt / "base.raw")
    try:
        for i in range(80):  # a boot: enough reads over enough chunks
            assert reader.read((i * 37 % 190) * 16384, 4096) == b"\xa1" * 4096
        tail = reader.read(3 * MiB, MiB)  # like dd bs=1M iflag=direct: past the end
        assert tail == b"\xa1" * 100
    finally:
        reader.close()
    wait_for(mnt, "base.raw", lambda la: (la.get("trace") or {}).get("status") == "ready")
    mount.unmount()
    again = mount_factory(store, mnt, "allow_other")
    reader = DirectReader(mnt / "base.raw")  # attaches the layer, loads its traces
    try:
        reader.read(0)
    finally:
        reader.close()
    layer = wait_for(mnt, "base.raw", lambda la: (la.get("trace") or {}).get("status")
                     not in (None, "loading", "recording"))
    assert layer["trace"]["status"] == "ready", layer
    assert "ignoring trace file" not in again.log()


# 7 ------------------------------------------------------------------------------------
def _big_directory(store: Path, n: int = 1500) -> Path:
    directory = store / "many"
    directory.mkdir()
    for i in range(n):
        (directory / f"f{i:05d}").write_bytes(b"x")
    return directory


def test_ls_l_of_a_big_directory_under_the_usual_soft_limit(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    _big_directory(store)
    # systemd's default soft limit; the hard limit (as it is) leaves room to raise it.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard >= 4096, f"the test needs a hard limit of open files >= 4096, not {hard}"
    mount = mount_factory(store, mnt, "allow_other",
                          wrapper=("prlimit", "--nofile=1024:", "--"))
    out = run("ls", "-l", mnt / "many").stdout
    assert len(out.splitlines()) == 1501  # "total" and one line per file
    assert stats(mnt)["fds"]["limit"] == hard
    assert stats(mnt)["fds"]["in_use"] > 1500
    assert daemon_fds(mount.pid) > 1500


def test_running_out_of_descriptors_is_one_clear_error_and_the_mount_lives(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    _big_directory(store)
    (store / "small").mkdir()
    (store / "small" / "file").write_bytes(b"hello")
    make_layer(store)
    mount = mount_factory(store, mnt, "allow_other",
                          wrapper=("prlimit", "--nofile=1024:1024", "--"),
                          allow=("out of file descriptors",))
    keep = open(mnt / "base.raw", "rb")  # an open file keeps working through it all
    try:
        result = run("ls", "-l", mnt / "many", check=False)
        assert result.returncode != 0
        assert "Too many open files in system" in result.stderr
        assert "out of file descriptors" in mount.log()
        assert "LimitNOFILE" in mount.log()
        assert keep.read(4) == b"\xa1" * 4
        assert stats(mnt)["fds"]["limit"] == 1024
        assert mount.proc.poll() is None
        # Once the kernel lets go of the listing, lookups work again.
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        deadline = time.monotonic() + 10
        while run("cat", mnt / "small" / "file", check=False).returncode != 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert (mnt / "small" / "file").read_bytes() == b"hello"
    finally:
        keep.close()
