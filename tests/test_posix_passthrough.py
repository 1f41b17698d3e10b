"""POSIX semantics through a real mount: what a shell user, libvirt and qemu rely on."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from scachefs import syscalls
from tests.mounting import Mount, daemon_fds, drop_caches, run


def test_shell_tools(store: Path, mnt: Path, mounted: Mount) -> None:
    data = os.urandom(3 << 20)
    (store / "blob").write_bytes(data)
    run("cp", mnt / "blob", mnt / "copy")
    assert (store / "copy").read_bytes() == data
    run("dd", f"if={mnt / 'blob'}", f"of={mnt / 'dd.out'}", "bs=1M", "status=none")
    assert (store / "dd.out").read_bytes() == data
    run("dd", "if=/dev/zero", f"of={mnt / 'dd.out'}", "bs=4k", "count=1", "seek=10",
        "conv=notrunc,fsync", "status=none")
    assert (store / "dd.out").read_bytes()[40960:45056] == bytes(4096)
    run("mv", mnt / "copy", mnt / "moved")
    assert not (store / "copy").exists() and (store / "moved").read_bytes() == data
    run("ln", mnt / "moved", mnt / "hard")
    assert os.stat(mnt / "hard").st_ino == os.stat(mnt / "moved").st_ino
    assert os.stat(mnt / "hard").st_nlink == 2
    run("ln", "-s", "moved", mnt / "soft")
    assert os.readlink(mnt / "soft") == "moved"
    assert (mnt / "soft").read_bytes() == data
    listing = run("ls", "-la", mnt).stdout
    for name in (" .\n", " ..\n", " blob\n", " hard\n", " soft -> moved\n"):
        assert name in listing, listing
    out = run("stat", "-c", "%s %h %F", mnt / "moved").stdout.split(maxsplit=2)
    assert out == [str(len(data)), "2", "regular file\n"]
    df_mnt = run("df", "-P", mnt).stdout.splitlines()[1].split()
    df_store = run("df", "-P", store).stdout.splitlines()[1].split()
    assert df_mnt[1] == df_store[1]  # total size: the store's numbers


def test_inode_numbers_are_the_stores(store: Path, mnt: Path, mounted: Mount) -> None:
    (store / "f").write_bytes(b"x")
    (store / "d").mkdir()
    assert os.stat(mnt / "f").st_ino == os.stat(store / "f").st_ino
    assert os.stat(mnt / "d").st_ino == os.stat(store / "d").st_ino
    assert os.stat(mnt).st_ino == 1


def test_readdir_lists_dot_entries_and_everything(store: Path, mnt: Path,
                                                  mounted: Mount) -> None:
    names = {f"file{i:04d}" for i in range(700)}  # more than one readdir buffer
    for name in names:
        (store / name).write_bytes(b"")
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # os.listdir hides . and ..; scandir via ls -a shows what getdents returned.
        listed = run("ls", "-a1", mnt).stdout.split()
    finally:
        os.close(fd)
    assert listed[:2] == [".", ".."]
    assert set(listed[2:]) == names
    assert os.stat(mnt / "..").st_ino == os.stat(mnt.parent).st_ino  # no climbing into store


def test_setattr_mode_owner_size_times(store: Path, mnt: Path, mounted: Mount) -> None:
    path = mnt / "f"
    path.write_bytes(b"0123456789")
    os.chmod(path, 0o640)
    assert stat.S_IMODE(os.stat(store / "f").st_mode) == 0o640
    os.chown(path, 1234, 5678)
    assert (os.stat(store / "f").st_uid, os.stat(store / "f").st_gid) == (1234, 5678)
    os.truncate(path, 4)
    assert (store / "f").read_bytes() == b"0123"
    with open(path, "r+b") as f:
        os.ftruncate(f.fileno(), 2)
    assert (store / "f").read_bytes() == b"01"
    os.utime(path, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(store / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    run("touch", "-m", "-d", "2001-02-03 04:05:06", path)  # mtime only: atime kept
    st = os.stat(store / "f")
    assert st.st_atime_ns == 1_000_000_123
    assert time.gmtime(st.st_mtime).tm_year == 2001
    os.symlink("f", mnt / "link")
    os.chown(mnt / "link", 42, 43, follow_symlinks=False)
    assert os.lstat(store / "link").st_uid == 42 and os.stat(store / "f").st_uid == 1234


def test_directories_and_special_files(store: Path, mnt: Path, mounted: Mount) -> None:
    os.mkdir(mnt / "d", 0o750)
    assert stat.S_IMODE(os.stat(store / "d").st_mode) == 0o750
    (mnt / "d" / "x").write_bytes(b"1")
    with pytest.raises(OSError) as info:
        os.rmdir(mnt / "d")
    assert info.value.errno == errno.ENOTEMPTY
    os.unlink(mnt / "d" / "x")
    os.rmdir(mnt / "d")
    assert not (store / "d").exists()
    os.mkfifo(mnt / "fifo")
    assert stat.S_ISFIFO(os.stat(store / "fifo").st_mode)
    os.mknod(mnt / "plain", 0o600 | stat.S_IFREG)
    assert stat.S_ISREG(os.stat(store / "plain").st_mode)


def test_rename_flags(store: Path, mnt: Path, mounted: Mount) -> None:
    (store / "a").write_bytes(b"A")
    (store / "b").write_bytes(b"B")
    dfd = os.open(mnt, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as info:
            syscalls.renameat2(dfd, b"a", dfd, b"b", syscalls.RENAME_NOREPLACE)
        assert info.value.errno == errno.EEXIST
        syscalls.renameat2(dfd, b"a", dfd, b"b", syscalls.RENAME_EXCHANGE)
        assert (store / "a").read_bytes() == b"B" and (store / "b").read_bytes() == b"A"
        syscalls.renameat2(dfd, b"a", dfd, b"c", syscalls.RENAME_NOREPLACE)
        assert (store / "c").read_bytes() == b"B" and not (store / "a").exists()
    finally:
        os.close(dfd)
    os.rename(mnt / "c", mnt / "b")  # plain rename replaces
    assert (store / "b").read_bytes() == b"B"


def test_xattrs(store: Path, mnt: Path, mounted: Mount) -> None:
    path = mnt / "f"
    path.write_bytes(b"")
    os.setxattr(path, "user.scachefs.test", b"value\x00bin")
    assert os.getxattr(store / "f", "user.scachefs.test") == b"value\x00bin"
    assert os.getxattr(path, "user.scachefs.test") == b"value\x00bin"
    assert "user.scachefs.test" in os.listxattr(path)
    os.removexattr(path, "user.scachefs.test")
    assert "user.scachefs.test" not in os.listxattr(store / "f")
    with pytest.raises(OSError) as info:
        os.getxattr(path, "user.absent")
    assert info.value.errno == errno.ENODATA


def test_errno_passthrough(store: Path, mnt: Path, mounted: Mount) -> None:
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "absent")
    (store / "f").write_bytes(b"")
    with pytest.raises(FileExistsError):
        os.open(mnt / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with pytest.raises(NotADirectoryError):
        os.listdir(mnt / "f")
    os.mkdir(store / "d")
    with pytest.raises(IsADirectoryError):
        os.unlink(mnt / "d")


def test_fsync_and_write_reach_store(store: Path, mnt: Path, mounted: Mount) -> None:
    fd = os.open(mnt / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"durable", 100)
        os.fsync(fd)
        os.fdatasync(fd)
        assert (store / "f").read_bytes()[100:] == b"durable"
        assert os.pread(fd, 7, 100) == b"durable"
        assert os.pread(fd, 50, 100) == b"durable"  # short only at EOF
    finally:
        os.close(fd)
    # posix_fallocate reaches the store (glibc emulates it if the kernel says no).
    fd = os.open(mnt / "g", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
    finally:
        os.close(fd)
    assert os.stat(store / "g").st_size == 1 << 20


def test_open_files_survive_rename_and_unlink(store: Path, mnt: Path, mounted: Mount) -> None:
    (store / "f").write_bytes(b"hello world")
    with open(mnt / "f", "r+b") as f:
        os.rename(mnt / "f", mnt / "g")
        f.seek(0)
        assert f.read() == b"hello world"
        f.seek(0)
        f.write(b"HELLO")
        f.flush()
        assert (store / "g").read_bytes() == b"HELLO world"
        os.unlink(mnt / "g")
        f.seek(6)
        f.write(b"WORLD")
        f.flush()
        f.seek(0)
        assert f.read() == b"HELLO WORLD"
        assert os.fstat(f.fileno()).st_nlink == 0
    assert not (store / "g").exists()


def test_lookups_and_forget_do_not_leak_fds(store: Path, mnt: Path, mounted: Mount) -> None:
    (store / "sub").mkdir()
    for i in range(300):
        (store / "sub" / f"f{i}").write_bytes(b"x")
    drop_caches()
    time.sleep(0.5)
    before = daemon_fds(mounted.pid)
    for _ in range(3):
        for i in range(300):
            os.stat(mnt / "sub" / f"f{i}")
        run("ls", "-la", mnt / "sub")  # readdirplus entries count as lookups too
    during = daemon_fds(mounted.pid)
    assert during >= before + 300  # one O_PATH fd per known inode
    drop_caches()  # the kernel forgets its inodes
    deadline = time.monotonic() + 10
    while daemon_fds(mounted.pid) > before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert daemon_fds(mounted.pid) <= before + 2, (before, during, daemon_fds(mounted.pid))


def test_symlinks_are_never_followed_by_the_daemon(tmp_path: Path, store: Path, mnt: Path,
                                                   mounted: Mount) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.symlink(str(outside), store / "escape")
    os.symlink("../outside/secret", store / "rel-escape")
    st = os.lstat(mnt / "escape")
    assert stat.S_ISLNK(st.st_mode)
    assert os.readlink(mnt / "rel-escape") == "../outside/secret"
    # Creating through a symlink name must not create the file at the link's target.
    with pytest.raises(FileExistsError):
        os.open(mnt / "escape", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    # xattrs on a symlink are not applied to its target.
    with pytest.raises(OSError):
        os.setxattr(mnt / "escape", "user.x", b"1", follow_symlinks=False)
    assert "user.x" not in os.listxattr(outside)
