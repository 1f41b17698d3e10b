"""Operating scachefs: scachefs-stat, the control channel, mount(8), fstab, systemd, man pages."""

from __future__ import annotations

import argparse
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

from scachefs import tracecli
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
    assert Path("/sbin/mount.fuse.scachefs").exists(), \
        "make install (or, for a checkout, make setup) installs the mount helper"
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
    # This checkout's scachefs, not whatever is installed in /usr/local/bin.
    assert command.startswith("/usr/local/bin/scachefs ")
    command = command.replace("/usr/local/bin/scachefs", f"{sys.executable} -m scachefs", 1)
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
    for flag in ("--json", "--prometheus", "--prometheus-file", "--watch", "--timeout",
                 "--upgrade"):
        assert flag in stat_page
    # scachefs-trace(8): every command and option of its --help, and scachefs(8) names it.
    trace_page = subprocess.run(["man", "-l", str(REPO / "docs" / "man" / "scachefs-trace.8")],
                                env=env, capture_output=True, text=True, check=True).stdout
    assert "NAME" in trace_page and "SYNOPSIS" in trace_page and "OPTIONS" in trace_page
    parser = tracecli.build_parser()
    commands = next(a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"list", "show", "delete", "export", "import", "warm"}
    for name, sub in commands.items():
        assert f"scachefs-trace {name}" in trace_page, name
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in ("-h", "--help") or flag in trace_page, (name, flag)
    assert "scachefs-trace(8)" in scachefs_page and "scachefs-trace(8)" in stat_page


def test_help_prints_percent_signs_as_such() -> None:
    # The options text is an argparse epilog (RawDescriptionHelpFormatter): printed as
    # written, so it must say "%" where it means "%".
    out = subprocess.run([sys.executable, "-m", "scachefs", "--help"], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout
    assert "default: 25% of RAM" in out and "2G, 10%\n" in out, out
    assert "%%" not in out


# ---------------------------------------------------------------- scachefs-stat's command line


@pytest.mark.parametrize("args", [("--watch", "{mnt}"), ("{mnt}", "--watch"),
                                  ("--watch", "0.5", "{mnt}"), ("{mnt}", "--watch", "0.5"),
                                  ("--watch=0.5", "{mnt}")])
def test_watch_takes_the_mount_point_in_any_order(mnt: Path, mounted: Mount,
                                                  args: tuple[str, ...]) -> None:
    argv = [a.format(mnt=mnt) for a in args]
    proc = subprocess.Popen([*STAT, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        seen = b""
        deadline = time.monotonic() + 10
        while b"LAYER" not in seen and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            seen += proc.stdout.read() or b""
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert b"LAYER" in seen and f"scachefs-stat {mnt} (every".encode() in seen, (seen, err)


@pytest.mark.parametrize("args, message", [
    (("--watch", "0"), "--watch must be at least 0.1 seconds, not '0'"),
    (("--watch", "-1"), "--watch must be at least 0.1 seconds, not '-1'"),
    (("--watch", "nan"), "--watch must be at least 0.1 seconds"),
    (("--watch", "soon"), "--watch must be a number of seconds, not 'soon'"),
    (("--timeout", "0"), "--timeout must be at least"),
    (("--timeout", "-5"), "--timeout must be at least"),
    (("--timeout", "inf"), "--timeout must be at least")])
def test_stat_refuses_nonsense_intervals(mnt: Path, mounted: Mount, args: tuple[str, ...],
                                         message: str) -> None:
    result = stat_cmd(*args, mnt, check=False)
    assert result.returncode == 2 and message in result.stderr, result
    assert "usage: scachefs-stat" in result.stderr
    assert stat_cmd("--timeout", "9.5", mnt).returncode == 0  # any positive number: fine


def test_stat_without_a_mount_point_says_so() -> None:
    result = stat_cmd("--json", check=False)
    assert result.returncode == 2 and "required: MOUNTPOINT" in result.stderr


@pytest.mark.parametrize("mode", [(), ("--json",), ("--prometheus",), ("--watch", "0.2")])
def test_stat_into_a_closed_pipe_exits_quietly(mnt: Path, mounted: Mount,
                                               mode: tuple[str, ...]) -> None:
    """`scachefs-stat MNT | head -2`: the reader goes away; no BrokenPipeError traceback,
    but the death by SIGPIPE other tools die (the shell shows 141)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([*STAT, *mode, mnt], stdout=write_end, stderr=subprocess.PIPE,
                                timeout=30, check=False)
    finally:
        os.close(write_end)
    assert result.stderr == b"" and result.returncode == -signal.SIGPIPE, result


def test_stat_into_head_exits_quietly(mnt: Path, mounted: Mount) -> None:
    result = run("bash", "-o", "pipefail", "-c",
                 f"{sys.executable} -m scachefs.stat --watch 0.1 {mnt} | head -2", check=False)
    assert result.returncode == 128 + signal.SIGPIPE and result.stderr == "", result
    assert len(result.stdout.splitlines()) == 2


# ---------------------------------------------------------------- Prometheus


def prometheus_samples(text: str) -> dict[tuple[str, str | None], float]:
    return {(s.name, s.labels.get("layer") or s.labels.get("le")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_prometheus_histogram_has_every_bucket_from_the_start(
        store: Path, mnt: Path, mounted: Mount) -> None:
    expected = [str(1 << bits) for bits in range(12, 25)] + ["+Inf"]

    def buckets() -> dict[str, float]:
        text = stat_cmd("--prometheus", mnt).stdout
        return {le: v for (name, le), v in prometheus_samples(text).items()
                if name == "scachefs_store_read_size_bytes_bucket" and le is not None}

    idle = buckets()
    assert list(idle) == expected and set(idle.values()) == {0.0}
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    qemu_io(mnt / "vm.qcow2", "read -P 0xa1 0 1M", cache="none")
    busy = buckets()
    assert list(busy) == expected  # the same series, whatever was read
    counts = list(busy.values())
    assert counts == sorted(counts) and counts[-1] > 0  # cumulative
    doc = json.loads(stat_cmd("--json", mnt).stdout)
    assert counts[-1] == doc["totals"]["store_reads"]


def test_prometheus_reports_a_dead_mount_as_down(tmp_path: Path, store: Path, mnt: Path,
                                                 mounted: Mount) -> None:
    prom = tmp_path / "textfile" / "scachefs.prom"
    prom.parent.mkdir()
    assert stat_cmd("--prometheus-file", prom, mnt).returncode == 0
    first = prom.stat()
    assert prometheus_samples(prom.read_text())[("scachefs_up", None)] == 1
    assert stat_cmd("--prometheus-file", prom, mnt).returncode == 0
    # Written by rename over the old file (node_exporter never reads half a file) ...
    assert prom.stat().st_ino != first.st_ino
    assert sorted(p.name for p in prom.parent.iterdir()) == ["scachefs.prom"]  # ... no debris
    # A path that is no mount is down too, and says why on stderr.
    result = stat_cmd("--prometheus", store, check=False)
    assert result.returncode == 0 and "is not a scachefs mount" in result.stderr
    assert prometheus_samples(result.stdout)[("scachefs_up", None)] == 0
    mounted.proc.kill()  # the holder first, so that no successor takes over
    mounted.proc.wait()
    os.kill(mounted.pid, signal.SIGKILL)
    time.sleep(0.2)
    result = stat_cmd("--prometheus", mnt, check=False)
    assert result.returncode == 0 and "daemon is dead" in result.stderr, result
    samples = prometheus_samples(result.stdout)
    assert samples == {("scachefs_up", None): 0.0}
    assert f'scachefs_up{{mountpoint="{mnt}"}} 0.0' in result.stdout
    assert stat_cmd("--prometheus-file", prom, mnt).returncode == 0
    assert prometheus_samples(prom.read_text()) == {("scachefs_up", None): 0.0}
    # Only a file that cannot be written is a failure of the command.
    result = stat_cmd("--prometheus-file", tmp_path / "missing" / "x.prom", mnt, check=False)
    assert result.returncode == 1 and "cannot write" in result.stderr
    mounted.kill()


def test_upgrade_of_a_restart_off_mount_says_why(store: Path, mnt: Path,
                                                 mount_factory: MountFactory) -> None:
    mount_factory(store, mnt, "allow_other", "restart=off")
    result = stat_cmd("--upgrade", mnt, check=False)
    assert result.returncode == 1
    assert "restart=off" in result.stderr and "no holder" in result.stderr, result.stderr
    assert "unmount it and mount it again" in result.stderr


def test_generic_options_of_other_fstab_lines_mount(store: Path, mnt: Path,
                                                    mount_factory: MountFactory) -> None:
    """An fstab line copied from ext4 or NFS: its options are ignored or applied."""
    mount_factory(store, mnt, "allow_other", "defaults,lazytime,nodiratime,nosymfollow,"
                  "_rnetdev,nofail,X-mount.mkdir,x-systemd.automount,iversion")
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        line = next(li for li in info if li.split()[4] == str(mnt))
    flags = line.split()[5].split(",")
    assert "nodiratime" in flags and "nosymfollow" in flags, line
    result = run(sys.executable, "-m", "scachefs", store, mnt, "-o", "cache_size=1K",
                 check=False)
    assert result.returncode == 2 and "too small" in result.stderr, result
