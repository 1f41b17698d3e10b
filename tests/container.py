"""systemd 252 as PID 1 in a systemd-nspawn container, for tests of the unit files.

`ensure_root()` builds (once, cached in CACHE_DIR/v{ROOT_VERSION}/) a Debian 12 minbase
root with systemd, dbus, python3-venv and fuse3, made with debootstrap from the apt mirror
this machine already uses. `Container` copies that root, installs scachefs into it
(`install_scachefs`: `make install`'s scripts/install, with pip fed the wheels built here,
as the container has no package index), boots it with
`systemd-nspawn --boot --register=no --keep-unit --bind=/dev/fuse` and runs commands in
it with nsenter. PID 1 of this machine is not systemd: the container's systemd is the
only one there is.

Host packages: debootstrap, systemd-container (systemd-nspawn), util-linux (nsenter).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.guest import (
    SUITE,
    GuestBuildError,
    _debootstrap,
    _locked,
    _remove_tree,
    find_apt_mirror,
)

ROOT_VERSION = "sysd-1"  # bump to force a rebuild
CACHE_DIR = Path(os.environ.get("SCACHEFS_CONTAINER_CACHE", "/var/cache/scachefs-container"))
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "fuse3",
            "util-linux", "procps", "kmod")
REPO = Path(__file__).resolve().parent.parent
_PATH = ":".join(dict.fromkeys([*os.environ.get("PATH", "").split(":"), "/usr/local/sbin",
                                "/usr/sbin", "/usr/bin", "/sbin", "/bin"]))
TOOLS = ("debootstrap", "systemd-nspawn", "nsenter", "unshare")


class ContainerError(RuntimeError):
    """The container could not be built or booted."""


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool, path=_PATH) is None]


def ensure_root(progress: Callable[[str], None] = print) -> tuple[Path, dict[str, object]]:
    """The cached root (built now unless there) and its build.json."""
    final = CACHE_DIR / f"v{ROOT_VERSION}"
    if not (final / "build.json").exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        with _locked(CACHE_DIR / ".lock", progress) as lock_fd:
            if not (final / "build.json").exists():
                for stale in CACHE_DIR.glob(".build-*"):
                    _remove_tree(stale)
                work = CACHE_DIR / f".build-v{ROOT_VERSION}-{os.getpid()}"
                work.mkdir()
                try:
                    _build(work, lock_fd, progress)
                    os.sync()
                    os.rename(work, final)
                except BaseException:
                    _remove_tree(work)
                    raise
    info = json.loads((final / "build.json").read_text())
    return final / "root", info


def _build(work: Path, lock_fd: int, progress: Callable[[str], None]) -> None:
    missing = missing_tools()
    if missing:
        raise ContainerError(f"missing host tools {missing}: apt-get install debootstrap "
                             "systemd-container util-linux")
    started = time.monotonic()
    mirror = os.environ.get("SCACHEFS_GUEST_MIRROR") or find_apt_mirror()
    root = work / "root"
    progress(f"container: debootstrap {SUITE} from {mirror} into {root}")
    import tests.guest as guest
    saved = guest.PACKAGES
    guest.PACKAGES = PACKAGES  # _debootstrap includes guest.PACKAGES
    try:
        _debootstrap(root, mirror, work / "debootstrap.log", lock_fd, progress)
    except GuestBuildError as exc:
        raise ContainerError(str(exc)) from None
    finally:
        guest.PACKAGES = saved
    (root / "etc/hostname").write_text("scachefs-sysd\n")
    (root / "etc/machine-id").write_text("5ca5ef5c0ffee0ddba11ad5ca1ab1e00\n")
    # Nothing that waits for a console or the network.
    for unit in ("console-getty.service", "getty@tty1.service",
                 "systemd-networkd-wait-online.service"):
        link = root / "etc/systemd/system" / unit
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to("/dev/null")
    seconds = round(time.monotonic() - started, 1)
    info = {"root_version": ROOT_VERSION, "mirror": mirror, "packages": PACKAGES,
            "build_seconds": seconds}
    (work / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    progress(f"container: root built in {seconds} s")


def build_wheels(out: Path) -> list[Path]:
    """Wheels of what installing this checkout needs (its dependencies and the build
    backend), for an install without a package index inside the container."""
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(out)]
    subprocess.run([*pip, str(REPO)], check=True, capture_output=True)
    subprocess.run([*pip, "setuptools>=77"], check=True, capture_output=True)
    return sorted(out.glob("*.whl"))


def install_scachefs(root: Path, wheels: Path) -> None:
    """Install scachefs into the (not yet booted) root the way docs/install.md says:
    `make install` (scripts/install, which is what it runs; the minbase root has no
    make): a wheel of this checkout in a venv under /opt/scachefs, the commands in
    /usr/local/bin, the mount(8) helper at /sbin/mount.fuse.scachefs, the service
    template in /usr/local/lib/systemd/system. pip finds everything in ``wheels``.
    """
    src = root / "tmp/scachefs-src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache",
        ".pytest_cache", "build", "dist"))
    shutil.copytree(wheels, root / "tmp/wheels")
    proc = subprocess.run(
        ["chroot", str(root), "env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
         "/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "PIP_NO_INDEX=1",
         "PIP_FIND_LINKS=/tmp/wheels", "PIP_DISABLE_PIP_VERSION_CHECK=1",
         "bash", "/tmp/scachefs-src/scripts/install", "install"],
        capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ContainerError(f"scripts/install failed ({proc.returncode}):\n{proc.stdout}"
                             f"{proc.stderr}")
    shutil.rmtree(src)
    shutil.rmtree(root / "tmp/wheels")


class Container:
    """A booted copy of the cached root; `run()` runs a command inside it."""

    def __init__(self, root: Path, workdir: Path) -> None:
        self.root = root
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.console = workdir / "console.log"
        self.boot_seconds = 0.0

    def boot(self, timeout: float = 90.0) -> float:
        """Boot; the seconds until systemd reached its default target (or running state)."""
        started = time.monotonic()
        console = self.console.open("wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--boot", "-D", str(self.root), "--register=no", "--keep-unit",
             "--console=passive", "--bind=/dev/fuse", "--private-network",
             "--machine=scachefs-sysd"],
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            env=dict(os.environ, PATH=_PATH, SYSTEMD_NSPAWN_TMPFS_TMP="0"),
            start_new_session=True)
        console.close()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited ({self.proc.returncode}):\n"
                                     + self.console.read_text(errors="replace")[-3000:])
            self.leader = self._find_leader()
            if self.leader:
                state = self.run(["systemctl", "is-system-running"], check=False,
                                 timeout=10).stdout.strip()
                if state in ("running", "degraded"):
                    self.boot_seconds = time.monotonic() - started
                    return self.boot_seconds
            time.sleep(0.3)
        raise ContainerError("the container did not finish booting in time:\n"
                             + self.console.read_text(errors="replace")[-3000:])

    def _find_leader(self) -> int:
        """The container's PID 1 as seen from here: the child of systemd-nspawn."""
        assert self.proc is not None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
                            ).read_text().split()
        except OSError:
            return 0
        for child in children:
            try:
                comm = Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:
                continue
            if comm == "systemd":
                return int(child)
        return 0

    def run(self, cmd: list[str] | str, check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run cmd (a list, or a shell command line) inside the container."""
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        full = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C",
                "-r", "-w", "env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                "/usr/bin:/sbin:/bin", "LANG=C.UTF-8", *cmd]
        proc = subprocess.run(full, capture_output=True, text=True, errors="replace",
                              timeout=timeout, input=input,
                              env=dict(os.environ, PATH=_PATH))
        if check and proc.returncode != 0:
            raise ContainerError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}"
                                 f"{proc.stderr}")
        return proc

    def popen(self, cmd: list[str]) -> subprocess.Popen[str]:
        full = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C",
                "-r", "-w", "env", "-i", "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8", *cmd]
        return subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True,
                                env=dict(os.environ, PATH=_PATH))

    def journal(self, unit: str | None = None, lines: int = 200) -> str:
        cmd = ["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines)]
        if unit:
            cmd += ["-u", unit]
        return self.run(cmd, check=False).stdout

    def poweroff(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            os.kill(self.leader, signal.SIGRTMIN + 4)  # systemd: poweroff
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def booted(setup: Callable[[Path], None], wheels: Path,
           progress: Callable[[str], None] = print) -> Iterator[Container]:
    """A fresh copy of the cached root, scachefs installed, setup(root) applied, booted."""
    root, _ = ensure_root(progress)
    workdir = Path(tempfile.mkdtemp(prefix="scachefs-sysd-", dir="/var/tmp"))
    copy = workdir / "root"
    try:
        subprocess.run(["cp", "-a", "--reflink=auto", str(root), str(copy)], check=True)
        install_scachefs(copy, wheels)
        setup(copy)
        container = Container(copy, workdir)
        try:
            container.boot()
            yield container
        finally:
            container.poweroff()
    finally:
        _remove_tree(workdir)


if __name__ == "__main__":
    path, build = ensure_root()
    print(path, build)
