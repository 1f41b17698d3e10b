"""allow_other with a real unprivileged user: the store's permissions, and callers own new files."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import USER, Mount, run


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """pytest's tmp_path is private to root; the test user must reach store and mount."""
    path = Path(tempfile.mkdtemp(prefix="scachefs-perm-"))
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


def as_user(*cmd: str | os.PathLike[str], check: bool = True) -> int:
    return run(*cmd, user=USER, check=check).returncode


def test_user_gets_exactly_the_stores_permissions(store: Path, mnt: Path, mounted: Mount,
                                                  user: pwd.struct_passwd) -> None:
    (store / "secret").write_bytes(b"root only")
    (store / "secret").chmod(0o600)
    (store / "public").write_bytes(b"everyone")
    (store / "public").chmod(0o644)
    assert run("cat", mnt / "secret", user=USER, check=False).returncode != 0
    assert "Permission denied" in run("cat", mnt / "secret", user=USER, check=False).stderr
    assert run("cat", mnt / "public", user=USER).stdout == "everyone"
    assert as_user("sh", "-c", f"echo x >> {mnt / 'public'}", check=False) != 0
    assert (store / "public").read_bytes() == b"everyone"
    assert as_user("touch", mnt / "new-in-root-dir", check=False) != 0
    assert not (store / "new-in-root-dir").exists()


def test_new_files_belong_to_the_caller(store: Path, mnt: Path, mounted: Mount,
                                        user: pwd.struct_passwd) -> None:
    shared = store / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    as_user("touch", mnt / "shared" / "mine")
    as_user("mkdir", mnt / "shared" / "mydir")
    as_user("ln", "-s", "mine", mnt / "shared" / "mylink")
    as_user("mkfifo", mnt / "shared" / "myfifo")
    for name in ("mine", "mydir", "mylink", "myfifo"):
        st = os.lstat(shared / name)
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid), name
    as_user("chmod", "600", mnt / "shared" / "mine")
    assert stat.S_IMODE(os.stat(shared / "mine").st_mode) == 0o600
    assert as_user("chown", "root", mnt / "shared" / "mine", check=False) != 0
    # Sticky directory: the user cannot delete root's file in it.
    (shared / "roots").write_bytes(b"")
    assert as_user("rm", "-f", mnt / "shared" / "roots", check=False) != 0
    assert (shared / "roots").exists()


def test_setgid_directory_passes_on_its_group(store: Path, mnt: Path, mounted: Mount,
                                              user: pwd.struct_passwd) -> None:
    group = grp.getgrnam("users")
    team = store / "team"
    team.mkdir()
    os.chown(team, 0, group.gr_gid)
    team.chmod(0o2777)
    as_user("touch", mnt / "team" / "f")
    assert os.stat(team / "f").st_gid == group.gr_gid
    assert os.stat(team / "f").st_uid == user.pw_uid


def test_user_builds_an_overlay_on_a_root_base(store: Path, mnt: Path, mounted: Mount,
                                              user: pwd.struct_passwd) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", store / "base.qcow2", "16M")
    run("qemu-io", "-c", "write -P 0x61 0 1M", store / "base.qcow2")
    (store / "base.qcow2").chmod(0o644)
    home = store / "vms"
    home.mkdir()
    os.chown(home, user.pw_uid, user.pw_gid)
    as_user("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2",
            mnt / "vms" / "vm.qcow2")
    out = run("qemu-io", "-c", "write -P 0x62 1M 1M", "-c", "read -P 0x61 0 1M",
              "-c", "read -P 0x62 1M 1M", mnt / "vms" / "vm.qcow2", user=USER).stdout
    assert "Pattern verification failed" not in out
    assert os.stat(home / "vm.qcow2").st_uid == user.pw_uid
    # The base stays read-only for the user.
    assert run("qemu-io", "-c", "write 0 4k", mnt / "base.qcow2", user=USER,
               check=False).returncode != 0
