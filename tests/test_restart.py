"""The daemon dies or is upgraded under running VMs: no VM sees an error, the cache stays warm.

scachefs runs as a holder (which keeps /dev/fuse, the state and the cache arena)
and a serving daemon. These tests kill the daemon with SIGKILL at random moments
under real clients (qemu-io boot replays and writers with pattern checks, fio
with crc32c verification, a real TCG guest writing files), upgrade it to other
code with SIGHUP, kill the holder, corrupt the state, and check what every
client saw. ``make soak`` runs the long version (SCACHEFS_RESTART_KILLS).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from scachefs.stat import StatError, read_stats
from tests.conftest import MountFactory
from tests.mounting import Mount, run
from tests.test_boot_traces import boot_script, make_boot_base, replay_args
from tests.test_crash import SLOT, pattern
from tests.test_faults import IoResult, image_check, qio
from tests.test_shadow_cache import layer_stats, overlay, stats

MiB = 1 << 20
KILLS = int(os.environ.get("SCACHEFS_RESTART_KILLS", "10"))
REPO = Path(__file__).resolve().parent.parent


def generation(mnt: Path) -> int:
    return int(stats(mnt)["generation"])


def wait_generation(mount: Mount, at_least: int, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            doc = stats(mount.mountpoint)
            if doc["generation"] >= at_least:
                mount.refresh_pid()
                return doc
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no generation {at_least}:\n{mount.log()[-3000:]}"
        time.sleep(0.05)


class Probe(threading.Thread):
    """Reads a layer (served by the daemon) every 20 ms; records how long each read took."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.latencies: list[tuple[float, float]] = []  # (start, seconds)
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            i = 0
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    os.pread(fd, 4096, (i * 1_048_576) % (60 * MiB))
                except OSError as exc:
                    self.errors.append(str(exc))
                self.latencies.append((start, time.monotonic() - start))
                i += 1
                time.sleep(0.02)
        finally:
            os.close(fd)

    def stalls(self, kills: list[float]) -> list[float]:
        """For each kill, the longest read that was running at it or started after it."""
        out = []
        for at in kills:
            around = [d for s, d in self.latencies if s + d >= at and s <= at + 5]
            out.append(max(around, default=0.0))
        return out


class Loop(threading.Thread):
    """Runs a command again and again; keeps every run's result."""

    def __init__(self, name: str, command: list[str]) -> None:
        super().__init__(daemon=True, name=name)
        self.command = command
        self.results: list[subprocess.CompletedProcess[str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.results.append(subprocess.run(self.command, capture_output=True, text=True,
                                               check=False, timeout=300))


class Writer(threading.Thread):
    """A VM that writes and flushes slot after slot; what exits 0 was acknowledged."""

    def __init__(self, image: Path) -> None:
        super().__init__(daemon=True)
        self.image = image
        self.acked: list[int] = []
        self.failed: list[IoResult] = []
        self.stop = threading.Event()

    def run(self) -> None:
        for i in range(1000):
            if self.stop.is_set():
                return
            result = qio(self.image, f"write -P {pattern(i):#x} {i * SLOT} 64k", "flush")
            if result.returncode == 0 and result.done == [("wrote", i * SLOT, 64 * 1024)]:
                self.acked.append(i)
            else:
                self.failed.append(result)


def fio_verify(path: Path) -> list[str]:
    return ["fio", "--name=verify", f"--filename={path}", "--size=16M", "--bs=4k",
            "--rw=randwrite", "--direct=1", "--ioengine=libaio", "--iodepth=8",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
            "--randrepeat=0", "--output-format=terse"]


def test_sigkill_under_load_no_client_sees_an_error(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_boot_base(store)
    for i in range(2):
        overlay(store, f"r{i}.qcow2", "base.qcow2")
    overlay(store, "w.qcow2", "base.qcow2")
    overlay(store, "probe.qcow2", "base.qcow2")
    (store / "disk.raw").write_bytes(bytes(16 * MiB))
    mount = mount_factory(store, mnt, "allow_other", "cache_size=128M")
    script = boot_script(think_ms=2)
    readers = [Loop(f"reader{i}", replay_args(mnt / f"r{i}.qcow2", script)) for i in range(2)]
    fio = Loop("fio", fio_verify(mnt / "disk.raw"))
    writer = Writer(mnt / "w.qcow2")
    probe = Probe(mnt / "base.qcow2")
    workers: list[threading.Thread] = [*readers, fio, writer, probe]
    for w in workers:
        w.start()
    rng = random.Random(11)
    kills: list[float] = []
    try:
        time.sleep(1.0)
        for k in range(KILLS):
            time.sleep(rng.uniform(0.3, 1.5))
            pid = mount.pid
            kills.append(time.monotonic())
            os.kill(pid, signal.SIGKILL)
            doc = wait_generation(mount, k + 1)
            assert doc["pid"] != pid and doc["restart"]["cause"] == "crashed: killed by SIGKILL"
        time.sleep(1.0)
    finally:
        for w in workers:
            w.stop.set()  # type: ignore[attr-defined]
        for w in workers:
            w.join(timeout=300)
    # What the clients saw: nothing at all.
    for loop in readers:
        for result in loop.results:
            assert result.returncode == 0, result.stdout + result.stderr
            assert "failed" not in result.stdout and "verification" not in result.stdout
    assert fio.results and all(r.returncode == 0 for r in fio.results), fio.results[-1]
    assert not writer.failed, writer.failed[0].output
    assert not probe.errors, probe.errors
    assert len(writer.acked) > 10
    checks = [f"read -P {pattern(i):#x} {i * SLOT} 64k" for i in writer.acked]
    for image in (mnt / "w.qcow2", store / "w.qcow2"):
        back = qio(image, *checks)
        assert back.returncode == 0 and not back.failures and not back.wrong_bytes, back.output
    for name in ("w.qcow2", "r0.qcow2", "r1.qcow2"):
        image_check(store / name)
    assert stats(mnt)["generation"] == KILLS
    stalls = sorted(probe.stalls(kills))
    p99 = stalls[min(len(stalls) - 1, int(len(stalls) * 0.99))]
    print(f"\n{KILLS} restarts under load: stall p50 {statistics.median(stalls):.3f} s, "
          f"p99 {p99:.3f} s, max {stalls[-1]:.3f} s; {len(writer.acked)} acknowledged "
          f"writes, {sum(len(r.results) for r in readers)} boot replays, "
          f"{len(fio.results)} fio verify runs")
    assert stalls[-1] < 10  # a stall, never a hang (the numbers: docs/benchmarks.md)


def test_the_cache_is_still_warm_after_a_restart(store: Path, mnt: Path,
                                                 mount_factory: MountFactory) -> None:
    make_boot_base(store)
    for i in range(4):
        overlay(store, f"vm{i}.qcow2", "base.qcow2")
    mount = mount_factory(store, mnt, "allow_other", "cache_size=256M")
    script = boot_script(think_ms=0)

    def storm() -> None:
        procs = [subprocess.Popen(replay_args(mnt / f"vm{i}.qcow2", script),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(4)]
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0 and "verification failed" not in out, out

    storm()
    first = layer_stats(mnt, "base.qcow2")
    working_set = first["store_bytes"]
    served = first["hit_bytes"] + first["miss_bytes"]
    assert working_set > 8 * MiB
    os.kill(mount.pid, signal.SIGKILL)
    wait_generation(mount, 1)
    storm()
    after = layer_stats(mnt, "base.qcow2")  # the new daemon's counters
    assert after["store_bytes"] <= 0.05 * working_set, (after["store_bytes"], working_set)
    assert after["hit_bytes"] + after["miss_bytes"] == served  # the same storm, all served
    assert "the cache kept" in mount.log()


def test_upgrade_hands_over_to_the_new_code(tmp_path: Path, store: Path, mnt: Path,
                                            mount_factory: MountFactory) -> None:
    # The holder starts daemons with `python -m scachefs` from its working directory:
    # a copy of the package there is "the installed code", changed between generations.
    code = tmp_path / "code"
    shutil.copytree(REPO / "scachefs", code / "scachefs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    make_boot_base(store)
    overlay(store, "r.qcow2", "base.qcow2")
    overlay(store, "w.qcow2", "base.qcow2")
    (store / "disk.raw").write_bytes(bytes(16 * MiB))
    mount = mount_factory(store, mnt, "allow_other", cwd=code)
    assert stats(mnt)["version"] == "0.1.0"
    reader = Loop("reader", replay_args(mnt / "r.qcow2", boot_script(think_ms=2)))
    fio = Loop("fio", fio_verify(mnt / "disk.raw"))
    writer = Writer(mnt / "w.qcow2")
    workers: list[threading.Thread] = [reader, fio, writer]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        init = code / "scachefs" / "__init__.py"
        init.write_text(init.read_text().replace('"0.1.0"', '"0.1.0+upgraded"'))
        old_pid = mount.pid
        os.kill(mount.holder_pid, signal.SIGHUP)  # what systemctl reload does
        doc = wait_generation(mount, 1)
        assert doc["version"] == "0.1.0+upgraded" and doc["pid"] != old_pid
        assert doc["restart"]["cause"] == "upgrade"
        time.sleep(0.5)
        # The same through the tool.
        out = run(sys.executable, "-m", "scachefs.stat", "--upgrade", mnt).stdout
        assert "upgraded in" in out and "generation 2" in out, out
        time.sleep(1.0)
    finally:
        for w in workers:
            w.stop.set()  # type: ignore[attr-defined]
        for w in workers:
            w.join(timeout=300)
    for result in reader.results:
        assert result.returncode == 0 and "failed" not in result.stdout, result.stdout
    assert fio.results and all(r.returncode == 0 for r in fio.results), fio.results[-1]
    assert not writer.failed, writer.failed[0].output
    image_check(store / "w.qcow2")
    assert "hands over" in mount.log() and "upgrade: starting the new daemon" in mount.log()


def test_without_its_holder_the_daemon_serves_on_then_the_mount_ends_cleanly(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_boot_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    mount = mount_factory(store, mnt, "allow_other")
    held = os.open(mnt / "base.qcow2", os.O_RDONLY)
    try:
        mount.proc.kill()  # the holder
        mount.proc.wait(timeout=10)
        ok = qio(mnt / "vm.qcow2", "read -P 0x42 0 1M", "write -P 0x11 0 64k", "flush")
        assert ok.returncode == 0, ok.output  # the daemon holds the connection too
        os.kill(mount.pid, signal.SIGKILL)  # now nobody holds it: it ends, no hang
        started = time.monotonic()
        gone = run("stat", mnt / "vm.qcow2", check=False, timeout=10)
        assert gone.returncode != 0, gone.stderr
        assert "not connected" in gone.stderr or "connection abort" in gone.stderr, gone.stderr
        with pytest.raises(OSError):
            os.pread(held, 4096, 0)
        assert time.monotonic() - started < 5
    finally:
        os.close(held)
    mount.kill()


def test_a_corrupt_state_falls_back_to_ending_the_mount(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_boot_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    mount = mount_factory(store, mnt, "allow_other",
                          allow=("cannot be restarted",))
    assert qio(mnt / "vm.qcow2", "read -P 0x42 0 1M").returncode == 0
    holder_fds = Path(f"/proc/{mount.holder_pid}/fd")
    state = next(p for p in holder_fds.iterdir() if "scachefs-state" in os.readlink(p))
    with open(state, "r+b") as f:  # scribble over the state log's region heads
        f.seek(4096)
        f.write(os.urandom(64))
    os.kill(mount.pid, signal.SIGKILL)
    assert mount.proc.wait(timeout=20) == 1  # the holder lets the mount go
    result = run("stat", mnt / "vm.qcow2", check=False, timeout=10)
    assert result.returncode != 0
    assert "cannot be restarted (its state cannot be read" in mount.log()
    mount.kill()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_guest_boots_and_writes_through_restarts(store: Path, mnt: Path,
                                                   mount_factory: MountFactory) -> None:
    from tests.guest import boot, ensure_guest_image, new_overlay, place_base

    image = ensure_guest_image()
    place_base(image, store)
    new_overlay(store, "vm.qcow2")
    mount = mount_factory(store, mnt, "allow_other")
    result: list[Any] = []
    guest = threading.Thread(target=lambda: result.append(
        boot(mnt / "vm.qcow2", image, cache="none", job="write-files", timeout=900)))
    guest.start()
    kills = 0
    rng = random.Random(5)
    while guest.is_alive() and kills < 4:
        time.sleep(rng.uniform(3, 8))
        if not guest.is_alive():
            break
        os.kill(mount.pid, signal.SIGKILL)
        kills += 1
        wait_generation(mount, kills)
    guest.join(timeout=900)
    (booted,) = result
    assert kills >= 2, "the guest finished before the daemon was killed twice"
    assert booted.reached_multi_user and booted.returncode == 0, booted.console[-3000:]
    job = booted.job_output()
    assert "WRITE-FILES-OK" in job and "FAILED" not in job, booted.console[-3000:]
    assert "I/O error" not in booted.console and "EXT4-fs error" not in booted.console
    raw = store / "vm.raw"
    run("qemu-img", "convert", "-O", "raw", store / "vm.qcow2", raw)
    fsck = run("e2fsck", "-fn", raw, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    image_check(store / "vm.qcow2")
    print(f"\nguest booted and wrote 48 MiB through {kills} daemon restarts "
          f"(generation {stats(mnt)['generation']})")


_LAUNCHER = """
import fcntl, os, sys
fds = [int(v) for v in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way of 3..
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)  # where systemd puts them, inheritable
for fd in high + [f for f in fds if f >= 3 + len(fds)]:
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
                  LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


def test_with_systemds_fd_store_a_new_holder_takes_the_mount_over(
        store: Path, mnt: Path, tmp_path: Path) -> None:
    """systemd's protocol, played by the test (PID 1 here is not systemd): the holder gives
    its descriptors to the fd store (FDSTORE=1 over $NOTIFY_SOCKET); after the holder and
    its daemon are killed, a new holder started with them (LISTEN_FDS) takes over."""
    import array
    import socket

    make_boot_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    log = open(tmp_path / "holders.log", "ab")
    command = ["-m", "scachefs", str(store), str(mnt), "-f", "-o", "allow_other"]
    first = subprocess.Popen([sys.executable, *command], env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    stored: dict[str, int] = {}
    second: subprocess.Popen[bytes] | None = None
    held = -1
    try:
        ready = False
        while not ready:
            data, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
            message = data.decode()
            if "READY=1" in message:
                ready = True
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    name = message.split("FDNAME=")[1].strip()
                    stored[name] = array.array("i", payload)[0]
        assert sorted(stored) == ["scachefs-arena", "scachefs-fuse", "scachefs-root",
                                  "scachefs-state"]
        assert qio(mnt / "vm.qcow2", "read -P 0x42 0 1M", "write -P 0x33 0 64k",
                   "flush").returncode == 0
        held = os.open(mnt / "vm.qcow2", os.O_RDONLY)
        daemon = int(json.loads(os.getxattr(mnt, "user.scachefs.stats"))["pid"])
        first.kill()  # the holder dies; systemd then kills what is left of the unit
        first.wait(timeout=10)
        os.kill(daemon, signal.SIGKILL)
        time.sleep(0.3)
        names = list(stored)
        fds = [stored[n] for n in names]
        second = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, ",".join(map(str, fds)), ":".join(names),
             *command], env=env, pass_fds=fds, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            # This test holds the connection too: a mount nobody serves would block a
            # plain getxattr for good, so ask with a timeout, and watch the new holder.
            assert second.poll() is None, (tmp_path / "holders.log").read_text()
            try:
                doc = read_stats(str(mnt), timeout=2)
                if doc["generation"] >= 1:
                    break
            except StatError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "holders.log").read_text()
            time.sleep(0.1)
        assert doc["restart"]["cause"] == "holder restart"
        assert os.pread(held, 4, 0) == b"QFI\xfb"  # a VM's open disk never noticed
        back = qio(mnt / "vm.qcow2", "read -P 0x33 0 64k", "read -P 0x42 1M 1M")
        assert back.returncode == 0 and not back.wrong_bytes, back.output
        assert "took the mount back from systemd's fd store" in (
            tmp_path / "holders.log").read_text()
    finally:
        if held >= 0:
            os.close(held)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
        for fd in stored.values():
            os.close(fd)
        notify.close()
        log.close()
    assert second is not None and second.returncode == 0
