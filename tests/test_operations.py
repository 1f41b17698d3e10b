"""Operating scachefs: scachefs-stat, the control channel, mount(8), fstab, systemd, man pages."""

from __future__ import annotations

import array
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scachefs.cli import OPTIONS_HELP
from tests.conftest import MountFactory
from tests.mounting import Mount, mount_type, run
from tests.test_permissions import USER, public_dir  # noqa: F401 (fixture)
from tests.test_qemu_passthrough import make_base, qemu_io
from tests.test_shadow_cache import layer_stats, overlay

STAT = [sys.executable, "-m", "scachefs.stat"]
REPO = Path(__file__).resolve().parent.parent


def stat_cmd(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(*STAT, *args, check=check, timeout=30)


def test_stats_agree_with_what_was_read(store: Path, mnt: Path, mounted: Mount) -> None:
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    qemu_io(mnt / "vm.qcow2", "read -P 0xb2 8M 2M", cache="none")
    first = layer_stats(mnt, "base.qcow2")
    qemu_io(mnt / "vm.qcow2", "read -P 0xb2 8M 2M", cache="none")
    second = layer_stats(mnt, "base.qcow2")
    assert second["store_bytes"] == first["store_bytes"]  # nothing new from the store
    assert second["hit_ops"] > first["hit_ops"]
    assert second["hit_bytes"] - first["hit_bytes"] >= 2 << 20
    doc = json.loads(stat_cmd("--json", mnt).stdout)
    assert doc["schema"] == 1 and doc["mountpoint"] == str(mnt)
    assert doc["totals"]["store_bytes"] >= second["store_bytes"]
    table = stat_cmd(mnt).stdout
    assert re.search(r"^base\.qcow2\s", table, re.MULTILINE), table
    for word in ("LAYER", "RESIDENT", "HIT%", "SERVED", "STORE", "JOINS", "cache ", "store "):
        assert word in table


def test_prometheus_output_parses_and_matches(store: Path, mnt: Path, mounted: Mount) -> None:
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    qemu_io(mnt / "vm.qcow2", "read -P 0xa1 0 1M", cache="none")
    text = stat_cmd("--prometheus", mnt).stdout
    families = {f.name: f for f in text_string_to_metric_families(text)}
    doc = json.loads(stat_cmd("--json", mnt).stdout)
    layer = next(la for la in doc["layers"] if la["path"] == "base.qcow2")
    samples = {(s.name, s.labels.get("layer")): s.value
               for f in families.values() for s in f.samples}
    assert samples[("scachefs_layer_store_read_bytes_total", "base.qcow2")] == \
        layer["store_bytes"]
    assert samples[("scachefs_cache_budget_bytes", None)] == doc["cache"]["budget_bytes"]
    assert families["scachefs_layer_store_read_bytes"].type == "counter"
    assert families["scachefs_store_read_size_bytes"].type == "histogram"
    assert samples[("scachefs_store_read_size_bytes_count", None)] == \
        doc["totals"]["store_reads"]


def test_unprivileged_user_reads_stats_but_cannot_act(
        public_dir: Path, mount_factory: MountFactory, user: object) -> None:  # noqa: F811
    store, mnt = public_dir / "store", public_dir / "mnt"
    store.mkdir(mode=0o755)
    mnt.mkdir(mode=0o755)
    mounted = mount_factory(store, mnt, "allow_other")
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    qemu_io(mnt / "vm.qcow2", "read -P 0xa1 0 1M", cache="none")
    out = run(*STAT, "--json", mnt, user=USER).stdout
    assert json.loads(out)["schema"] == 1
    command = '{"action": "drop"}'
    result = run("setfattr", "-n", "user.scachefs.command", "-v", command, mnt, user=USER,
                 check=False)
    assert result.returncode != 0 and "Permission denied" in result.stderr  # the kernel
    # With a root the user may write to, the kernel lets the request through and the
    # daemon itself refuses it: actions are for root and the mount's owner only.
    mnt.chmod(0o777)  # through the mount, so the kernel sees it at once (no sticky bit)
    result = run("setfattr", "-n", "user.scachefs.command", "-v", command, mnt, user=USER,
                 check=False)
    assert result.returncode != 0 and "Operation not permitted" in result.stderr
    assert "control request from uid" in mounted.log()
    assert layer_stats(mnt, "base.qcow2")["resident_bytes"] > 0
    run("setfattr", "-n", "user.scachefs.command", "-v", command, mnt)  # root may
    assert layer_stats(mnt, "base.qcow2")["resident_bytes"] == 0
    mounted.allow = ("control request from uid",)


def test_malformed_control_requests_are_refused(store: Path, mnt: Path,
                                                mounted: Mount) -> None:
    for bad, err in ((b"{", errno.EINVAL), (b"[]", errno.EINVAL),
                     (b'{"action": "explode"}', errno.EINVAL),
                     (b'{"action": "drop", "path": "nope"}', errno.ENOENT),
                     (b'{"action": "log_level", "level": "LOUD"}', errno.EINVAL),
                     (os.urandom(300), errno.EINVAL)):
        with pytest.raises(OSError) as info:
            os.setxattr(mnt, "user.scachefs.command", bad)
        assert info.value.errno == err, bad
    with pytest.raises(OSError):
        os.setxattr(mnt, "user.scachefs.stats", b"{}")
    assert stats_alive(mnt)
    mounted.allow = ("control request from uid",)


def stats_alive(mnt: Path) -> bool:
    return json.loads(os.getxattr(mnt, "user.scachefs.stats"))["schema"] == 1


def test_stat_errors_on_non_mounts_dead_and_stuck_daemons(store: Path, mnt: Path,
                                                          mounted: Mount) -> None:
    result = stat_cmd(store, check=False)
    assert result.returncode == 1 and "is not a scachefs mount" in result.stderr
    os.kill(mounted.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        result = stat_cmd("--timeout", "2", mnt, check=False)
        assert result.returncode == 1 and "does not answer" in result.stderr
        assert time.monotonic() - start < 10
    finally:
        os.kill(mounted.pid, signal.SIGCONT)
    assert stat_cmd(mnt).returncode == 0
    mounted.proc.kill()  # the holder first, so that no successor takes over
    mounted.proc.wait()
    os.kill(mounted.pid, signal.SIGKILL)  # then the daemon
    time.sleep(0.2)
    start = time.monotonic()
    result = stat_cmd(mnt, check=False)
    assert result.returncode == 1 and "daemon is dead" in result.stderr, result.stderr
    assert "fusermount3 -uz" in result.stderr
    assert time.monotonic() - start < 10
    mounted.kill()  # lazily unmount the dead mount


def test_watch_refreshes_in_a_terminal(store: Path, mnt: Path, mounted: Mount) -> None:
    tmux = shutil.which("tmux")
    assert tmux, "tmux is missing: make test installs it"
    session = f"scachefs-watch-{os.getpid()}"
    run(tmux, "new-session", "-d", "-s", session, "-x", "160", "-y", "40",
        f"{sys.executable} -m scachefs.stat --watch 0.5 {mnt}")
    try:
        time.sleep(1.5)
        first = run(tmux, "capture-pane", "-p", "-t", session).stdout
        make_base(store)
        overlay(store, "vm.qcow2", "base.qcow2")
        qemu_io(mnt / "vm.qcow2", "read -P 0xa1 0 1M", cache="none")
        time.sleep(1.5)
        second = run(tmux, "capture-pane", "-p", "-t", session).stdout
    finally:
        run(tmux, "kill-session", "-t", session, check=False)
    assert "LAYER" in first and "(no backing layers found yet)" in first, first
    assert "base.qcow2" in second and "(no backing layers" not in second, second
    assert first.splitlines()[0][:8] != second.splitlines()[0][:8]  # the clock moved


@pytest.fixture
def system_mount(store: Path, mnt: Path) -> Iterator[Path]:
    """A mount point that is unmounted after the test whatever happened."""
    assert Path("/sbin/mount.fuse.scachefs").exists(), "make setup installs the mount helper"
    yield mnt
    if mount_type(mnt) is not None:
        run("umount", "-l", mnt, check=False)


def test_mount_t_and_umount(store: Path, system_mount: Path) -> None:
    mnt = system_mount
    (store / "f").write_bytes(b"via mount(8)")
    run("mount", "-t", "fuse.scachefs", store, mnt, "-o", "allow_other,cache_size=64M,_netdev")
    assert mount_type(mnt) == (str(store), "fuse.scachefs")
    assert (mnt / "f").read_bytes() == b"via mount(8)"
    findmnt = run("findmnt", "-n", "-o", "FSTYPE,SOURCE", mnt).stdout.split()
    assert findmnt == ["fuse.scachefs", str(store)]
    run("umount", mnt)
    assert mount_type(mnt) is None
    bad = run("mount", "-t", "fuse.scachefs", store / "missing", mnt, check=False)
    assert bad.returncode != 0 and "cannot open SOURCE" in bad.stderr
    bad = run("mount", "-t", "fuse.scachefs", store, mnt, "-o", "cache_sise=1G", check=False)
    assert bad.returncode != 0 and "cache_sise" in bad.stderr
    assert mount_type(mnt) is None


def test_fstab_line(tmp_path: Path, store: Path, system_mount: Path) -> None:
    mnt = system_mount
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{store} {mnt} fuse.scachefs "
                     "allow_other,cache_size=64M,noauto,nofail,_netdev,"
                     "x-systemd.requires=network-online.target 0 0\n")
    run("mount", "-T", fstab, mnt)
    assert mount_type(mnt) == (str(store), "fuse.scachefs")
    os.listdir(mnt)
    run("umount", mnt)
    assert mount_type(mnt) is None


def test_systemd_units_verify(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing"
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(REPO / "mount-helpers" / "var-lib-scache.mount", units)
    shutil.copy(REPO / "mount-helpers" / "scachefs@.service",
                units / "scachefs@var-lib-scache.service")
    result = run("systemd-analyze", "verify", units / "var-lib-scache.mount",
                 units / "scachefs@var-lib-scache.service", check=False)
    assert result.returncode == 0, result.stderr
    # The verifier is not vacuous: a broken unit is refused.
    (units / "broken.service").write_text("[Service]\nExecStart=/nonexistent/scachefs\n")
    assert run("systemd-analyze", "verify", units / "broken.service",
               check=False).returncode != 0


def test_service_command_line_notifies_systemd(tmp_path: Path, store: Path, mnt: Path) -> None:
    """Exactly what scachefs@.service runs, with a NOTIFY_SOCKET like systemd's."""
    unit = (REPO / "mount-helpers" / "scachefs@.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE)
    assert exec_start is not None
    command = (exec_start.group(1).replace("${SCACHEFS_SOURCE}", str(store))
               .replace("%f", str(mnt)).replace("${SCACHEFS_OPTIONS}", "allow_other"))
    sock_path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    proc = subprocess.Popen(command.split(), env={**os.environ, "NOTIFY_SOCKET": str(sock_path)},
                            stderr=subprocess.PIPE)
    def messages_until(word: str) -> list[str]:
        """Datagrams up to the one holding ``word``; descriptors sent along are closed."""
        seen = []
        while True:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
            for _, _, payload in ancillary:
                for fd in array.array("i", payload):
                    os.close(fd)
            seen.append(data.decode())
            if word in seen[-1]:
                return seen

    try:
        before = messages_until("READY=1")
        assert mount_type(mnt) == (str(store), "fuse.scachefs")  # live when READY=1 came
        # Before it: the holder's descriptors for the fd store (see test_restart.py).
        assert sorted(m.split("FDNAME=")[1] for m in before if "FDSTORE=1" in m) == [
            "scachefs-arena", "scachefs-fuse", "scachefs-root", "scachefs-state"]
        os.listdir(mnt)
        proc.send_signal(signal.SIGTERM)
        messages_until("STOPPING=1")
        assert proc.wait(timeout=20) == 0
        after = messages_until("FDNAME=scachefs-arena")  # the fd store is emptied
        assert all("FDSTOREREMOVE=1" in m for m in after[-4:]), after
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    assert mount_type(mnt) is None


def test_man_pages_render_and_cover_every_option() -> None:
    env = {**os.environ, "MANWIDTH": "100"}
    for page in ("scachefs.8", "scachefs-stat.8"):
        out = subprocess.run(["man", "-l", str(REPO / "docs" / "man" / page)], env=env,
                             capture_output=True, text=True, check=True).stdout
        assert "NAME" in out and "SYNOPSIS" in out and "OPTIONS" in out
    scachefs_page = subprocess.run(["man", "-l", str(REPO / "docs" / "man" / "scachefs.8")],
                                   env=env, capture_output=True, text=True, check=True).stdout
    for name in re.findall(r"^  ([a-z_]+)[= ]", OPTIONS_HELP, re.MULTILINE):
        assert name in scachefs_page, f"option {name} is in --help but not in scachefs(8)"
    stat_page = subprocess.run(["man", "-l", str(REPO / "docs" / "man" / "scachefs-stat.8")],
                               env=env, capture_output=True, text=True, check=True).stdout
    for flag in ("--json", "--prometheus", "--watch", "--timeout", "--upgrade"):
        assert flag in stat_page


def test_help_prints_percent_signs_as_such() -> None:
    # The options text is an argparse epilog (RawDescriptionHelpFormatter): printed as
    # written, so it must say "%" where it means "%".
    out = subprocess.run([sys.executable, "-m", "scachefs", "--help"], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout
    assert "default: 25% of RAM" in out and "2G, 10%\n" in out, out
    assert "%%" not in out
