"""The scachefs command: background start, failures, signals, findmnt, --help, scachefs-stat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import MountFactory
from tests.mounting import mount_type, run

SCACHEFS = [sys.executable, "-m", "scachefs"]


def wait_gone(mnt: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while mount_type(mnt) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mount_type(mnt) is None, "still mounted"


def test_background_mount_is_live_when_the_command_returns(store: Path, mnt: Path) -> None:
    (store / "hello").write_bytes(b"hi")
    result = run(*SCACHEFS, store, mnt, "-o", "defaults,noauto,nofail,_netdev,"
                 "x-systemd.requires=foo.service,allow_other")
    try:
        assert result.returncode == 0
        # No polling: the command returned only once the mount answered.
        assert (mnt / "hello").read_bytes() == b"hi"
        findmnt = run("findmnt", "-n", "-o", "SOURCE,TARGET,FSTYPE", mnt).stdout.split()
        assert findmnt == [str(store), str(mnt), "fuse.scachefs"]
        assert f"{store} on {mnt} type fuse.scachefs" in run("mount").stdout
    finally:
        run("fusermount3", "-u", mnt)
    wait_gone(mnt)


def test_sigterm_unmounts_cleanly(store: Path, mnt: Path) -> None:
    proc = subprocess.Popen([*SCACHEFS, str(store), str(mnt), "-f"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while mount_type(mnt) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mount_type(mnt) == (str(store), "fuse.scachefs")
    os.listdir(mnt)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert b"received SIGTERM, unmounting" in err
    assert b"Traceback" not in err
    wait_gone(mnt)


def test_failed_mount_reports_and_exits_non_zero(store: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    result = run(*SCACHEFS, store, missing, check=False)
    assert result.returncode == 1
    assert "cannot use MOUNTPOINT" in result.stderr and "mkdir -p" in result.stderr
    result = run(*SCACHEFS, tmp_path / "no-store", store, check=False)
    assert result.returncode == 1 and "cannot open SOURCE" in result.stderr


def test_unknown_option_is_named(store: Path, mnt: Path) -> None:
    result = run(*SCACHEFS, store, mnt, "-o", "allow_other,cache_sise=1G", check=False)
    assert result.returncode == 2
    assert "cache_sise" in result.stderr
    assert mount_type(mnt) is None


def test_help_lists_every_option() -> None:
    out = run(*SCACHEFS, "--help").stdout
    for word in ("SOURCE", "MOUNTPOINT", "--foreground", "--debug", "allow_other",
                 "cache_size", "chunk_size", "attr_timeout", "entry_timeout", "threads",
                 "max_tasks", "log_file", "nofail", "x-*"):
        assert word in out, word


def test_stat_refuses_a_path_that_is_not_a_mount(tmp_path: Path) -> None:
    result = run(sys.executable, "-m", "scachefs.stat", tmp_path, check=False)
    assert result.returncode != 0
    assert "is not a scachefs mount" in result.stderr
    result = run(Path(sys.executable).parent / "scachefs-stat", "/proc", check=False)
    assert result.returncode != 0 and "not a scachefs mount" in result.stderr


def test_debug_logs_every_request(store: Path, mnt: Path,
                                  mount_factory: MountFactory) -> None:
    """--debug (help, usage.md and the man page promise it): each request with its caller
    and its answer, from the session layer; without it, none."""
    mount = mount_factory(store, mnt, debug=True)
    quiet_mnt = mnt.parent / "quiet"
    quiet_mnt.mkdir()
    quiet = mount_factory(store, quiet_mnt)
    for where in (mnt, quiet_mnt):
        try:
            os.stat(where / "absent-name")
        except FileNotFoundError:
            pass
        (where / "made").write_bytes(b"x")
    lines = mount.log().splitlines()
    lookups = [line for line in lines if "LOOKUP unique=" in line and "-> ENOENT" in line]
    assert any(f"nodeid=1 uid=0 gid=0 pid={os.getpid()}" in line for line in lookups), lines
    assert any("CREATE unique=" in line and "-> OK" in line for line in lines), lines
    assert "unique=" not in quiet.log()
    # The log_level action switches it on and off on a live mount.
    os.setxattr(quiet_mnt, "user.scachefs.command", b'{"action": "log_level", "level": "debug"}')
    os.stat(quiet_mnt / "made")
    (quiet_mnt / "second").write_bytes(b"x")
    assert "CREATE unique=" in quiet.log()
    os.setxattr(quiet_mnt, "user.scachefs.command", b'{"action": "log_level", "level": "info"}')
    (quiet_mnt / "third").write_bytes(b"x")
    assert quiet.log().count("CREATE unique=") == 1


def test_a_background_mount_is_silent_and_a_failed_one_says_why(store: Path,
                                                                mnt: Path) -> None:
    """Scripts, fstab and test harnesses treat output on stderr as failure: a mount that
    works prints nothing (its log lines go where the detached daemon logs); one that
    fails after the fork still shows its warnings and the reason."""
    helper = Path(__file__).parent.parent / "mount-helpers" / "mount.fuse.scachefs"
    env = {**os.environ, "SCACHEFS": str(Path(sys.executable).parent / "scachefs")}
    commands = [[*SCACHEFS, str(store), str(mnt)],
                [*SCACHEFS, str(store), str(mnt), "-o", "restart=off"],
                [*SCACHEFS, str(store), str(mnt), "--debug"],
                ["sh", str(helper), str(store), str(mnt), "-o", "allow_other"]]
    log_file = mnt.parent / "given.log"
    commands.append([*SCACHEFS, str(store), str(mnt), "-o", f"log_file={log_file}"])
    # Where neither syslog nor the journal is there (/dev/log: containers, this test
    # machine), the logs go to a file named after the mount point, said in one line
    # (issue 19 item 13); a log_file= mount is silent everywhere.
    fallback = f"/var/log/scachefs/{str(mnt).strip('/').replace('/', '-')}.log"
    said = ("" if os.path.exists("/dev/log") else
            f"scachefs: no syslog or journal here (no /dev/log): logs go to {fallback}; "
            "-o log_file=PATH chooses\n")
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, env=env,
                                timeout=60, check=False)
        try:
            quiet = "" if "log_file" in " ".join(command) else said
            assert (result.returncode, result.stdout, result.stderr) == (0, "", quiet), command
            assert mount_type(mnt) == (str(store), "fuse.scachefs")
            os.listdir(mnt)
        finally:
            run("fusermount3", "-u", mnt, check=False)
        wait_gone(mnt)
    assert "serving " in log_file.read_text()
    if said:
        assert f"boot traces in {store}/.scache/traces" in Path(fallback).read_text()
    # Out of descriptors in the forked process, before the mount is live.
    result = run("prlimit", "--nofile=10:10", *SCACHEFS, store, mnt, check=False)
    assert result.returncode == 1, result
    assert "failed: Too many open files" in result.stderr, result.stderr
    assert "WARNING scachefs: the open-file limit is 10" in result.stderr, result.stderr
    assert mount_type(mnt) is None
