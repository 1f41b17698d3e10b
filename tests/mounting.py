"""Real scachefs mounts for integration tests: start the daemon, wait, unmount, check its log."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scachefs.stat import find_mount

USER = "scachefs-test"  # the unprivileged user the tests act as (conftest's `user`)

# Log lines that a test may have provoked on purpose are listed per mount in `allow`.
_BAD_LOG = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b")


def require_tool(name: str) -> str:
    """Path of a tool the tests need; fail loudly (never skip) when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed: run `make test`, whose setup installs it")
    return path


def run(*cmd: str | os.PathLike[str], check: bool = True, user: str | None = None,
        timeout: float = 300, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output, raise with its output when it fails."""
    args = [os.fspath(c) for c in cmd]
    if user is not None:
        args = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *args]
    proc = subprocess.run(args, capture_output=True, timeout=timeout,
                          input=input, check=False)
    result = subprocess.CompletedProcess(args, proc.returncode,
                                         proc.stdout.decode(errors="replace"),
                                         proc.stderr.decode(errors="replace"))
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed with {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def mount_type(path: Path) -> tuple[str, str] | None:
    """(source, fstype) of the topmost mount exactly at path."""
    return find_mount(os.fspath(path))


class Mount:
    """A scachefs daemon in the foreground, serving `source` at `mountpoint`."""

    def __init__(self, source: Path, mountpoint: Path, options: list[str],
                 log_path: Path, allow: tuple[str, ...] = (), debug: bool = False,
                 wrapper: tuple[str, ...] = (), cwd: Path | None = None) -> None:
        self.source = source
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.allow = allow
        # wrapper: a command the daemon runs under, e.g. ("prlimit", "--nofile=1024", "--")
        args = [*wrapper, sys.executable, "-m", "scachefs", str(source), str(mountpoint), "-f"]
        if options:
            args += ["-o", ",".join(options)]
        if debug:
            args.append("--debug")
        self._log = open(log_path, "ab")  # closed in unmount() or kill()
        # cwd: where `python -m scachefs` finds the package (the repository by default)
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd)
        self._daemon_pid = self.proc.pid
        self._wait_live()

    @property
    def pid(self) -> int:
        """The pid of the process serving requests (the holder's daemon), as the mount's
        statistics said when it came up or at the last :meth:`refresh_pid`."""
        return self._daemon_pid

    def refresh_pid(self) -> int:
        """Ask the mount again who serves it (a restarted daemon has a new pid)."""
        self._daemon_pid = int(json.loads(os.getxattr(self.mountpoint,
                                                      "user.scachefs.stats"))["pid"])
        return self._daemon_pid

    @property
    def holder_pid(self) -> int:
        """The ``scachefs`` process itself (with restart=off it serves requests too)."""
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_live(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"scachefs exited with {self.proc.returncode}:\n{self.log()}")
            if "mount is live" in self.log():
                mt = mount_type(self.mountpoint)
                assert mt is not None and mt[1] == "fuse.scachefs", mt
                with contextlib.suppress(PermissionError):  # not ours without allow_other
                    self.refresh_pid()
                return
            time.sleep(0.05)
        raise AssertionError(f"scachefs did not come up in {timeout}s:\n{self.log()}")

    def unmount(self) -> None:
        """Unmount with fusermount3 -u and wait for the daemon to exit cleanly."""
        if self.proc.poll() is None:
            run(require_tool("fusermount3"), "-u", self.mountpoint, timeout=30)
        try:
            code = self.proc.wait(timeout=30)
        finally:
            self._log.close()
        assert code == 0, f"scachefs exited with {code}:\n{self.log()}"

    def bad_log_lines(self) -> list[str]:
        """Tracebacks and ERROR lines that the test did not declare as expected."""
        return [line for line in self.log().splitlines()
                if _BAD_LOG.search(line) and not any(a in line for a in self.allow)]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True,
                       check=False)
        self._log.close()


def settle(path: Path, age: float = 3600.0) -> Path:
    """Date a file's mtime back by ``age`` seconds, as a base written long before the VMs
    boot from it is: scachefs caches nothing read under an identity younger than its
    settle time (a write may still be landing under it)."""
    old = time.time() - age
    os.utime(path, (old, old))
    return path


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def daemon_fd_targets(pid: int) -> dict[str, str]:
    """What each of the process's descriptors names, by descriptor number (ones that close
    while we look are left out)."""
    targets = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return targets


def drop_caches() -> None:
    """Drop the kernel's page, dentry and inode caches (makes FUSE send forgets)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
