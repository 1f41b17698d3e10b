"""File handles through the mount (issue 16 item 14)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from scachefs import syscalls
from tests.conftest import MountFactory


def test_the_mount_offers_no_file_handles_that_could_go_stale_or_name_another_file(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    """Issue 16 item 14: export support is not advertised (FUSE_NO_EXPORT_SUPPORT), so
    name_to_handle_at says EOPNOTSUPP instead of a handle that turns ESTALE once the
    kernel evicts the inode (or, with the store's inode number reused, names another
    file). The store's own handles work as before."""
    mount_factory(store, mnt, "allow_other")
    (store / "f").write_bytes(b"x")
    fd = os.open(store / "f", os.O_RDONLY)
    try:
        assert syscalls.file_handle(fd)
    finally:
        os.close(fd)
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            syscalls.file_handle(fd)
        assert caught.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
