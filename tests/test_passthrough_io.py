"""The kernel does the VMs' own I/O (FUSE passthrough); the daemon serves only shared layers.

Proven, not assumed: the daemon's request counters show that no READ or WRITE
of a plain file (an overlay, a VM's raw disk) reaches it while passthrough is
active, and that they all do when it is switched off. The per-inode rules of
the kernel (one backing file per inode, no passthrough beside an open that uses
the page cache) are exercised with a writer joining readers of a layer.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MountFactory
from tests.mounting import USER, run
from tests.test_consistency import DirectReader, make_layer
from tests.test_qemu_passthrough import make_base
from tests.test_shadow_cache import layer_stats, overlay, stats

MiB = 1 << 20


def requests(mnt: Path) -> dict[str, int]:
    counts: dict[str, int] = stats(mnt)["fuse"]["requests"]
    return counts


def daemon_io(mnt: Path) -> dict[str, int]:
    io: dict[str, int] = stats(mnt)["fuse"]["daemon_io"]
    return io


def fio(path: Path, *extra: str) -> str:
    return run("fio", "--name=vm", f"--filename={path}", "--size=64M", "--bs=4k",
               "--direct=1", "--ioengine=libaio", "--iodepth=16", "--rw=randrw",
               "--time_based", "--runtime=2", "--verify_state_save=0", *extra).stdout


@pytest.mark.parametrize("path", ["passthrough=auto", "passthrough=off"],
                         ids=["kernel", "daemon"])
def test_fio_and_qemu_io_on_plain_files_never_reach_the_daemon(
        store: Path, mnt: Path, mount_factory: MountFactory, path: str) -> None:
    disk = store / "disk.raw"
    disk.write_bytes(os.urandom(64 * MiB))
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    mount_factory(store, mnt, "allow_other", path)
    assert stats(mnt)["fuse"]["passthrough"] is (path == "passthrough=auto")
    before = requests(mnt)
    out = fio(mnt / "disk.raw")
    after = requests(mnt)
    assert " err= 0" in out, out
    reads = after.get("READ", 0) - before.get("READ", 0)
    writes = after.get("WRITE", 0) - before.get("WRITE", 0)
    # The overlay: whole-cluster writes and reads of them, over a layer the daemon serves.
    io_before = daemon_io(mnt)
    base_before = layer_stats(mnt, "base.qcow2")
    qemu = run("qemu-io", "--cache=none", "-c", "write -P 0x61 16M 1M", "-c",
               "read -P 0x61 16M 1M", "-c", "read -P 0xb2 8M 1M", mnt / "vm.qcow2").stdout
    assert "verification failed" not in qemu, qemu
    io_after = daemon_io(mnt)
    base_after = layer_stats(mnt, "base.qcow2")
    served = base_after["hit_bytes"] + base_after["miss_bytes"]
    assert served - base_before.get("hit_bytes", 0) - base_before.get("miss_bytes", 0) >= MiB
    if path == "passthrough=auto":
        assert (reads, writes) == (0, 0)
        assert io_after == io_before == {"reads": 0, "read_bytes": 0, "writes": 0,
                                         "write_bytes": 0}
        assert stats(mnt)["fuse"]["passthrough_off"] is None
    else:
        assert reads > 100 and writes > 100
        assert io_after["writes"] > io_before["writes"] and io_after["write_bytes"] >= MiB
        assert stats(mnt)["fuse"]["passthrough_off"] == "switched off (passthrough=off)"


def test_a_writer_beside_o_direct_readers_of_a_layer_is_seen_before_its_first_write(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    """qemu-img commit into the base while VMs read it (cache=none). The writer of a
    cached layer is served by the daemon (an open that never writes, like libvirt's at a
    domain stop, must not cost the cache: issue 19 item 1), so its first write reaches
    the daemon, which lets the cache go before doing it: readers never see old bytes."""
    make_layer(store, size=4 * MiB, fill=0x41)
    mount_factory(store, mnt, "allow_other")
    readers = [DirectReader(mnt / "base.raw") for _ in range(3)]  # qemu's cache=none
    try:
        assert all(r.read(0) == b"A" * 4096 for r in readers)
        assert layer_stats(mnt, "base.raw")["open_handles"] == 3
        writer = os.open(mnt / "base.raw", os.O_RDWR | os.O_DIRECT)
        try:
            assert stats(mnt)["fuse"]["passthrough_files"] == 0
            assert layer_stats(mnt, "base.raw")["attached"]  # an idle writer costs nothing
            before = requests(mnt).get("WRITE", 0)
            for r in readers:
                assert r.read(0) == b"A" * 4096
            block = DirectReader(mnt / "base.raw")  # an aligned buffer to write from
            try:
                block.buf[:4096] = b"B" * 4096
                assert os.pwritev(writer, [memoryview(block.buf)[:4096]], 0) == 4096
                os.fsync(writer)
                assert all(r.read(0) == b"B" * 4096 for r in readers)
                assert block.read(0) == b"B" * 4096
            finally:
                block.close()
            assert requests(mnt).get("WRITE", 0) == before + 1  # the daemon saw it
            assert not any(la["path"] == "base.raw" and la["attached"]
                           for la in stats(mnt)["layers"])
        finally:
            os.close(writer)
    finally:
        for r in readers:
            r.close()
    assert (store / "base.raw").read_bytes()[:4096] == b"B" * 4096
    again = DirectReader(mnt / "base.raw")
    try:
        assert again.read(0) == b"B" * 4096
        assert layer_stats(mnt, "base.raw")["attached"]  # cached again once the writer left
    finally:
        again.close()


def test_a_writer_beside_buffered_readers_of_a_layer_is_served_by_the_daemon(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_layer(store, size=4 * MiB, fill=0x41)
    mount_factory(store, mnt, "allow_other")
    with open(mnt / "base.raw", "rb", buffering=0) as reader:  # cache=writeback guests
        assert reader.read(4096) == b"A" * 4096
        before = requests(mnt).get("WRITE", 0)
        with open(mnt / "base.raw", "r+b", buffering=0) as writer:  # no EIO from the kernel
            writer.write(b"B" * 4096)
            os.fsync(writer.fileno())
            assert stats(mnt)["fuse"]["passthrough_files"] == 0
        assert requests(mnt).get("WRITE", 0) > before
        reader.seek(0)
        assert reader.read(4096) == b"B" * 4096
    assert (store / "base.raw").read_bytes()[:4096] == b"B" * 4096


@pytest.mark.parametrize("path", ["passthrough=auto", "passthrough=off"],
                         ids=["kernel", "daemon"])
def test_fallocate_holes_and_copy_file_range(store: Path, mnt: Path,
                                             mount_factory: MountFactory, path: str) -> None:
    mount_factory(store, mnt, "allow_other", path)
    disk = mnt / "disk.raw"
    run("fallocate", "-l", "8M", disk)  # pyfuse3 could not: EOPNOTSUPP
    assert os.stat(store / "disk.raw").st_size == 8 * MiB
    assert os.stat(store / "disk.raw").st_blocks * 512 >= 8 * MiB
    with open(disk, "r+b") as f:
        f.write(b"\x5a" * (8 * MiB))
    run("fallocate", "--punch-hole", "--offset", "1M", "--length", "2M", disk)
    assert os.stat(store / "disk.raw").st_blocks * 512 <= 6 * MiB + 64 * 1024
    data = (store / "disk.raw").read_bytes()
    assert data[MiB:3 * MiB] == bytes(2 * MiB) and data[:MiB] == b"\x5a" * MiB
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB
        assert os.lseek(fd, MiB, os.SEEK_DATA) == 3 * MiB
    finally:
        os.close(fd)
    run("cp", "--reflink=never", disk, mnt / "copy.raw")
    assert (store / "copy.raw").read_bytes() == data


@pytest.mark.parametrize("path", ["passthrough=auto", "passthrough=off"],
                         ids=["kernel", "daemon"])
def test_a_write_by_its_user_clears_setuid_as_on_the_store(
        public_dirs: tuple[Path, Path], mount_factory: MountFactory, path: str,
        user: pwd.struct_passwd) -> None:
    store, mnt = public_dirs
    mount_factory(store, mnt, "allow_other", path)
    target = store / "tool"
    target.write_bytes(b"#!/bin/sh\n")
    os.chown(target, user.pw_uid, user.pw_gid)
    target.chmod(0o6775)
    run("sh", "-c", f"printf x >> {mnt / 'tool'}", user=USER)
    mode = stat.S_IMODE(os.stat(target).st_mode)
    assert not mode & (stat.S_ISUID | stat.S_ISGID), oct(mode)
    assert target.read_bytes() == b"#!/bin/sh\nx"


@pytest.fixture
def public_dirs() -> Iterator[tuple[Path, Path]]:
    """A store and a mount point the unprivileged user can reach (tmp_path is root's)."""
    top = Path(tempfile.mkdtemp(prefix="scachefs-user-"))
    top.chmod(0o755)
    for name in ("store", "mnt"):
        (top / name).mkdir(mode=0o755)
    yield top / "store", top / "mnt"
    subprocess.run(["fusermount3", "-uz", str(top / "mnt")], capture_output=True, check=False)
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def user_dirs(user: pwd.struct_passwd, public_dirs: tuple[Path, Path]
              ) -> Iterator[tuple[Path, Path]]:
    """A store and a mount point that belong to the unprivileged user, who may mount.

    fusermount3 opens /dev/fuse with the user's rights; Debian's udev makes it 0666,
    a machine without udev may have left it 0600: then it is 0666 for the test.
    """
    for path in public_dirs:
        os.chown(path, user.pw_uid, user.pw_gid)
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o006 != 0o006:
        os.chmod("/dev/fuse", 0o666)
    try:
        yield public_dirs
    finally:
        os.chmod("/dev/fuse", mode)


def test_a_user_mounts_with_fusermount3_and_the_daemon_serves_its_io(
        user_dirs: tuple[Path, Path], mount_factory: MountFactory) -> None:
    store, mnt = user_dirs
    setpriv = ("setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", "--")
    mount = mount_factory(store, mnt, wrapper=setpriv, allow=("passthrough unavailable",))
    log: str = mount.log()
    assert "passthrough unavailable: registering backing files needs CAP_SYS_ADMIN" in log
    run("sh", "-c", f"echo hello > {mnt / 'f'} && cat {mnt / 'f'}", user=USER)
    assert (store / "f").read_text() == "hello\n"
    assert os.stat(store / "f").st_uid == pwd.getpwnam(USER).pw_uid
    out = run("getfattr", "-n", "user.scachefs.stats", "--only-values", mnt, user=USER).stdout
    doc: dict[str, Any] = __import__("json").loads(out)
    assert doc["fuse"]["passthrough"] is False and doc["fuse"]["daemon_io"]["writes"] >= 1


def test_passthrough_on_refuses_to_mount_without_it(
        user_dirs: tuple[Path, Path]) -> None:
    store, mnt = user_dirs
    result = run("setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", "--",
                 *_scachefs(), store, mnt, "-o", "passthrough=on", check=False)
    assert result.returncode != 0
    assert "passthrough=on, but passthrough is unavailable" in result.stderr
    assert "CAP_SYS_ADMIN" in result.stderr


def _scachefs() -> list[str]:
    import sys
    return [sys.executable, "-m", "scachefs"]


def test_layers_all_caches_a_directory_of_bases_without_its_overlays(
        store: Path, mnt: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    # OpenStack Nova: bases in instances/_base, overlays elsewhere with absolute backing paths.
    make_base(store)
    mount_factory(store, mnt, "allow_other", "layers=all")
    instances = tmp_path / "instances"
    instances.mkdir()
    vms = [instances / f"vm{i}.qcow2" for i in range(3)]
    for vm in vms:
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mnt / "base.qcow2", "-F", "qcow2",
            vm)
    for vm in vms:
        out = run("qemu-io", "--cache=none", "-c", "read -P 0xb2 8M 3M", vm).stdout
        assert "verification failed" not in out, out
    base = layer_stats(mnt, "base.qcow2")
    assert base["attached"] and base["images"] == 0  # no image in the mount names it
    assert base["store_bytes"] <= 3 * MiB + 2 * MiB  # read from the store once, not 3 times
    assert base["hit_bytes"] + base["miss_bytes"] >= 9 * MiB
    # Writable opens still pass through and are never cached.
    (store / "notes.txt").write_bytes(b"x")
    with open(mnt / "notes.txt", "r+b") as f:
        f.write(b"y")
    assert (store / "notes.txt").read_bytes() == b"y"
    assert "notes.txt" not in [la["path"] for la in stats(mnt)["layers"] if la["attached"]]
