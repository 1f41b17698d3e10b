"""Fixtures: a store directory, a mount point, and real scachefs mounts over them."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.mounting import USER, Mount, require_tool, run

MountFactory = Callable[..., Mount]


@pytest.fixture(scope="session", autouse=True)
def _environment() -> None:
    """The integration tests need root, /dev/fuse and fusermount3: fail loudly without."""
    assert os.geteuid() == 0, "the test suite mounts FUSE file systems: run it as root"
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing"
    require_tool("fusermount3")


@pytest.fixture(scope="session")
def user() -> pwd.struct_passwd:
    """An unprivileged user, created for the tests if the machine has none."""
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER)
        return pwd.getpwnam(USER)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    path.chmod(0o755)
    tmp_path.chmod(0o755)  # so an unprivileged test user can reach it
    return path


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[MountFactory]:
    """Start scachefs mounts; on teardown unmount each and fail on unexpected log errors."""
    mounts: list[Mount] = []

    def factory(source: Path, mountpoint: Path, *options: str,
                allow: tuple[str, ...] = (), debug: bool = False,
                wrapper: tuple[str, ...] = (), cwd: Path | None = None) -> Mount:
        log_path = tmp_path / f"scachefs-{len(mounts)}.log"
        mount = Mount(source, mountpoint, list(options), log_path, allow=allow, debug=debug,
                      wrapper=wrapper, cwd=cwd)
        mounts.append(mount)
        return mount

    yield factory
    problems = []
    for mount in reversed(mounts):
        if mount.proc.poll() is None:
            try:
                mount.unmount()
            except AssertionError as exc:
                mount.kill()
                problems.append(str(exc))
        bad = mount.bad_log_lines()
        if bad:
            problems.append(f"unexpected errors in the daemon log {mount.log_path}:\n"
                            + "\n".join(bad))
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def mounted(store: Path, mnt: Path, mount_factory: MountFactory) -> Mount:
    """scachefs over `store` at `mnt` with allow_other."""
    return mount_factory(store, mnt, "allow_other")
