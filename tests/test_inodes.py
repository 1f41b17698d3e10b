"""Unit tests for the inode table: numbering, lookup counts, fd lifetime."""

from __future__ import annotations

import os
from pathlib import Path

from scachefs.inodes import ROOT_INODE, InodeTable


def opath(path: Path) -> tuple[int, os.stat_result]:
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    return fd, os.fstat(fd)


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_numbers_are_store_inodes_and_hard_links_share_an_entry(tmp_path: Path) -> None:
    root_fd, root_st = opath(tmp_path)
    table = InodeTable(root_fd, root_st)
    assert table.get(ROOT_INODE) is table.root
    (tmp_path / "a").write_bytes(b"")
    os.link(tmp_path / "a", tmp_path / "b")
    ia = table.ref(*opath(tmp_path / "a"))
    fd_b, st_b = opath(tmp_path / "b")
    ib = table.ref(fd_b, st_b)
    assert ia is ib and ia.ino == st_b.st_ino and ia.nlookup == 2
    assert not fd_open(fd_b)  # the duplicate descriptor was closed
    assert len(table) == 2


def test_forget_releases_the_fd_only_at_zero(tmp_path: Path) -> None:
    table = InodeTable(*opath(tmp_path))
    (tmp_path / "f").write_bytes(b"")
    inode = table.ref(*opath(tmp_path / "f"))
    table.ref(*opath(tmp_path / "f"))
    table.forget(inode.ino, 1)
    assert table.get(inode.ino) is inode and fd_open(inode.fd)
    table.forget(inode.ino, 1)
    assert table.get(inode.ino) is None and not fd_open(inode.fd)
    table.forget(inode.ino, 1)  # unknown inodes are ignored, never raise
    table.forget(ROOT_INODE, 100)  # the root is never dropped
    assert table.get(ROOT_INODE) is table.root


def test_collisions_with_the_root_number_get_private_numbers(tmp_path: Path) -> None:
    table = InodeTable(*opath(tmp_path))
    (tmp_path / "f").write_bytes(b"")
    fd, st = opath(tmp_path / "f")
    fake = os.stat_result((st.st_mode, ROOT_INODE, st.st_dev, *st[3:10]))
    inode = table.ref(fd, fake)
    assert inode.ino != ROOT_INODE and inode.ino >= 1 << 63
    other_dev = os.stat_result((st.st_mode, 77, st.st_dev + 1, *st[3:10]))
    inode2 = table.ref(os.open(tmp_path / "f", os.O_PATH), other_dev)
    assert inode2.ino >= 1 << 63 and inode2.ino != inode.ino
    assert table.number_for(other_dev) == inode2.ino
