"""The cache across a restart: every slot of the arena has one owner, a restart never hands
a layer another layer's bytes, the arena stays within its budget, and a full cache evicts
instead of failing a read (issue 17, items 0-0e; issue 19, item 2).

Each test runs real mounts (``layers=all`` makes every read-only open a cached layer),
kills or upgrades the daemon, and compares every byte read through the mount with the
store.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from scachefs.arena import arena_bytes, slots_for
from tests.conftest import MountFactory
from tests.mounting import Mount, run
from tests.test_restart import wait_generation
from tests.test_shadow_cache import layer_stats, stats

KiB = 1 << 10
MiB = 1 << 20


def make_file(path: Path, size: int, seed: int) -> bytes:
    """A file of random bytes (every chunk differs from every other file's chunks)."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    old = time.time() - 3600  # a base written long ago (its identity is settled)
    os.utime(path, (old, old))
    return data


def read_through(path: Path, length: int | None = None) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read() if length is None else f.read(length)


def differing_chunks(got: bytes, want: bytes, chunk: int) -> int:
    assert len(got) == len(want), (len(got), len(want))
    return sum(1 for at in range(0, len(want), chunk) if got[at:at + chunk] != want[at:at + chunk])


def restart(mount: Mount, how: str) -> None:
    generation = int(stats(mount.mountpoint)["generation"])
    if how == "kill":
        os.kill(mount.pid, signal.SIGKILL)
    else:
        run("python3", "-m", "scachefs.stat", "--upgrade", mount.mountpoint)
    wait_generation(mount, generation + 1)


def test_a_restart_never_serves_another_layers_bytes(store: Path, mnt: Path,
                                                     mount_factory: MountFactory) -> None:
    """Issue 17 item 0: a full cache restored by a successor, then refilled by another layer."""
    chunk = 16 * KiB
    layer_l = make_file(store / "l.raw", 7 * MiB + 512 * KiB, 1)
    layer_m = make_file(store / "m.raw", 7 * MiB, 2)
    mount = mount_factory(store, mnt, "layers=all", "cache_size=8M", "chunk_size=16K",
                          "prefetch=off", "record=off")
    for how in ("kill", "upgrade"):
        assert read_through(mnt / "l.raw") == layer_l
        restart(mount, how)
        assert "the cache kept 7 MiB" in mount.log()
        got_m = read_through(mnt / "m.raw", 6 * MiB)
        assert differing_chunks(got_m, layer_m[:6 * MiB], chunk) == 0
        got_l = read_through(mnt / "l.raw")
        assert differing_chunks(got_l, layer_l, chunk) == 0, how
        got_m = read_through(mnt / "m.raw")
        assert differing_chunks(got_m, layer_m, chunk) == 0, how
        assert stats(mnt)["cache"]["used_bytes"] <= 8 * MiB


def test_a_full_cache_of_partial_chunks_evicts_instead_of_failing(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    """Issue 17 item 0c: every layer's last chunk is partial; reads never fail."""
    small = [make_file(store / f"s{i}.raw", 8 * KiB, 10 + i) for i in range(300)]
    base = make_file(store / "base.raw", 16 * MiB, 3)
    mount_factory(store, mnt, "layers=all", "cache_size=8M", "chunk_size=1M",
                  "prefetch=off", "record=off")
    for rnd in range(2):
        for i, data in enumerate(small):  # 300 slots that hold 8 KiB each
            assert read_through(mnt / f"s{i}.raw") == data, (rnd, i)
        assert read_through(mnt / "base.raw") == base, rnd
    assert stats(mnt)["cache"]["used_bytes"] <= 8 * MiB


def test_the_arena_stays_within_its_budget_across_restarts(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    """Issue 17 item 0d: each restart refills a full cache; the memfd's memory stays bounded."""
    files = [make_file(store / f"f{i}.raw", 6 * MiB, 20 + i) for i in range(6)]
    mount = mount_factory(store, mnt, "layers=all", "cache_size=8M", "chunk_size=1M",
                          "prefetch=off", "record=off")
    for i, data in enumerate(files):
        assert read_through(mnt / f"f{i}.raw") == data
        restart(mount, "kill")
    resident = arena_resident_bytes(mount.holder_pid)
    bound = arena_bytes(MiB, slots_for(MiB, 8 * MiB))
    assert resident <= bound <= 8 * MiB + 64 * KiB, (resident, bound)


def arena_resident_bytes(holder: int) -> int:
    """Memory the holder's cache memfd holds (its pages, mapped or not)."""
    for fd in os.listdir(f"/proc/{holder}/fd"):
        try:
            target = os.readlink(f"/proc/{holder}/fd/{fd}")
        except OSError:
            continue
        if "scachefs-cache" in target:
            st = os.stat(f"/proc/{holder}/fd/{fd}")
            return st.st_blocks * 512
    raise AssertionError(f"the holder {holder} has no cache memfd")


def test_a_warmed_layer_stays_warm_across_an_upgrade_without_an_open_file(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    """Issue 19 item 2: what the arena holds is adopted for every layer that still matches."""
    data = make_file(store / "base.raw", 6 * MiB, 4)
    mount = mount_factory(store, mnt, "layers=all", "cache_size=64M", "chunk_size=64K",
                          "prefetch=off", "record=off")
    assert read_through(mnt / "base.raw") == data
    resident = layer_stats(mnt, "base.raw")["resident_bytes"]
    assert resident == 6 * MiB
    for how in ("upgrade", "kill"):
        restart(mount, how)
        assert stats(mnt)["cache"]["used_bytes"] == 6 * MiB, how
        assert read_through(mnt / "base.raw") == data
        after = layer_stats(mnt, "base.raw")
        assert after["store_bytes"] == 0, (how, after)


def test_a_writer_open_across_a_takeover_still_keeps_its_layer_out_of_the_cache(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    """Issue 17 item 1: the successor counts the writers it restored, so O_DIRECT readers
    (qemu's cache=none) read what the writer wrote, not the cache's old bytes."""
    data = make_file(store / "layer.raw", 2 * MiB, 5)
    mount = mount_factory(store, mnt, "layers=all", "cache_size=64M", "prefetch=off",
                          "record=off")
    buffered = open(mnt / "layer.raw", "rb")
    direct = os.open(mnt / "layer.raw", os.O_RDONLY | os.O_DIRECT)
    writer = os.open(mnt / "layer.raw", os.O_RDWR)
    aligned = mmap.mmap(-1, 64 * KiB)
    try:
        assert buffered.read(64 * KiB) == data[:64 * KiB]
        restart(mount, "kill")
        for round_ in range(3):
            new = bytes([round_ + 1]) * (64 * KiB)
            assert os.pwrite(writer, new, 0) == len(new)
            assert os.preadv(direct, [aligned], 0) == 64 * KiB
            assert aligned[:] == new, round_
    finally:
        aligned.close()
        os.close(writer)
        os.close(direct)
        buffered.close()
    assert (store / "layer.raw").read_bytes()[:64 * KiB] == bytes([3]) * (64 * KiB)


def test_a_burst_of_upgrade_requests_is_merged_and_never_drops_the_mount(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    """Issue 17 item 3: SIGHUPs 30 ms apart, some while a successor is still starting: no
    daemon is killed by an early SIGUSR1, none counts as a crash, no reader sees an error."""
    data = make_file(store / "layer.raw", 4 * MiB, 6)
    mount = mount_factory(store, mnt, "layers=all", "cache_size=64M", "prefetch=off",
                          "record=off")
    errors: list[str] = []
    fd = os.open(mnt / "layer.raw", os.O_RDONLY)
    try:
        for i in range(150):
            os.kill(mount.holder_pid, signal.SIGHUP)
            time.sleep(0.03)
            try:
                at = (i * 64 * KiB) % len(data)
                if os.pread(fd, 4096, at) != data[at:at + 4096]:
                    errors.append(f"wrong bytes at {at}")
            except OSError as exc:
                errors.append(str(exc))
        time.sleep(1.0)
        assert os.pread(fd, 4096, 0) == data[:4096]
    finally:
        os.close(fd)
    assert errors == []
    log = mount.log()
    assert "crashed" not in log and "killed by" not in log, log[-3000:]
    generation = int(stats(mnt)["generation"])
    assert 1 <= generation < 150, generation  # upgrades happened, merged
    assert mount.proc.poll() is None


def test_sigterm_ends_the_mount_even_when_another_namespace_holds_a_copy(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    """Issue 17 item 5: a container started while the mount existed copied it; SIGTERM
    still ends the holder and its daemon in bounded time, and the copy gets ENOTCONN."""
    from scachefs.daemon import STOP_GRACE

    make_file(store / "f.raw", MiB, 7)
    mount = mount_factory(store, mnt, "allow_other")
    other = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{other.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        seen = run("nsenter", "-t", str(other.pid), "-m", "cat", mnt / "f.raw", check=False)
        assert seen.returncode == 0, seen.stderr
        daemon = mount.pid
        started = time.monotonic()
        os.kill(mount.holder_pid, signal.SIGTERM)
        code = mount.proc.wait(timeout=STOP_GRACE + 20)
        took = time.monotonic() - started
        assert code == 0, mount.log()[-2000:]
        assert took < STOP_GRACE + 10, took
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{daemon}"):
            assert time.monotonic() < deadline, "the daemon outlived its holder"
            time.sleep(0.1)
        after = run("nsenter", "-t", str(other.pid), "-m", "stat", mnt / "f.raw", check=False)
        assert after.returncode != 0 and "not connected" in after.stderr, after
        assert "still in use" in mount.log()
    finally:
        other.kill()
        other.wait()


def test_random_restarts_under_readers_of_more_layers_than_the_budget_holds(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    """Readers of three layers (18 MiB under an 8 MiB budget) compare every byte with the
    store while the daemon is SIGKILLed or upgraded at random moments."""
    layers = {f"l{i}.raw": make_file(store / f"l{i}.raw", 6 * MiB, 30 + i) for i in range(3)}
    mount = mount_factory(store, mnt, "layers=all", "cache_size=8M", "chunk_size=16K",
                          "prefetch=off", "record=off")
    stop = threading.Event()
    errors: list[str] = []
    reads = [0]

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        buf = mmap.mmap(-1, 256 * KiB)
        try:
            while not stop.is_set():
                name = rnd.choice(sorted(layers))
                want = layers[name]
                length = rnd.choice((4, 16, 64, 256)) * KiB
                at = rnd.randrange(0, len(want) - length + 1, 4 * KiB)
                direct = rnd.random() < 0.5
                try:
                    fd = os.open(mnt / name, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                    try:
                        with memoryview(buf) as whole, whole[:length] as view:
                            got = os.preadv(fd, [view], at)
                            if bytes(view[:got]) != want[at:at + length]:
                                errors.append(f"wrong bytes: {name} {at}+{length} "
                                              f"direct={direct}")
                    finally:
                        os.close(fd)
                    reads[0] += 1
                except OSError as exc:
                    errors.append(f"{name} {at}+{length}: {exc}")
        finally:
            buf.close()

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    rnd = random.Random(42)
    try:
        for i in range(8):
            time.sleep(rnd.uniform(0.3, 1.2))
            restart(mount, "kill" if i % 2 == 0 else "upgrade")
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert errors == [], errors[:10]
    assert reads[0] > 500, reads
    assert int(stats(mnt)["generation"]) == 8


@pytest.mark.parametrize("how", ["replaced", "deleted"])
@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_a_file_replaced_on_the_store_while_open_survives_a_takeover(
        store: Path, mnt: Path, mount_factory: MountFactory, how: str, direct: bool) -> None:
    """Issue 17 item 2: Nova replaces bases by rename under running VMs; a later crash
    must not turn their open base into EIO. The holder keeps a copy of every open file."""
    old = make_file(store / "base.raw", 2 * MiB, 8)
    mount = mount_factory(store, mnt, "layers=all", "cache_size=1M", "chunk_size=64K",
                          "prefetch=off", "record=off")
    fd = os.open(mnt / "base.raw", os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, 64 * KiB)
    try:
        assert os.preadv(fd, [buf], 0) == 64 * KiB and buf[:] == old[:64 * KiB]
        if how == "replaced":
            make_file(store / "base.new", 2 * MiB, 9)
            os.rename(store / "base.new", store / "base.raw")
        else:
            os.unlink(store / "base.raw")
        restart(mount, "kill")
        for at in range(0, 2 * MiB, 256 * KiB):  # mostly never read before: from the store
            assert os.preadv(fd, [buf], at) == 64 * KiB, at
            assert buf[:] == old[at:at + 64 * KiB], at
        assert os.fstat(fd).st_size == 2 * MiB
        restart(mount, "upgrade")
        assert os.preadv(fd, [buf], MiB + 64 * KiB) == 64 * KiB
        assert buf[:] == old[MiB + 64 * KiB:MiB + 128 * KiB]
    finally:
        buf.close()
        os.close(fd)
    assert "lost" not in mount.log().split("generation 1")[-1].split("\n")[0]
