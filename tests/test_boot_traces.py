"""Boot traces through real mounts: record with qemu-io replays, persist, prefetch, merge hosts."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from scachefs import traces as trace_format
from tests.conftest import MountFactory
from tests.mounting import drop_caches, run, settle
from tests.test_qemu_passthrough import qemu_io
from tests.test_shadow_cache import layer_stats, overlay, stats

MiB = 1 << 20


def make_boot_base(store: Path) -> Path:
    """A 128 MiB qcow2 base whose first 64 MiB hold data (pattern 0x42)."""
    base = store / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "128M")
    run("qemu-io", "-c", "write -P 0x42 0 64M", base)
    return settle(base)


def layer_fingerprint(layer: Path) -> bytes:
    """The fingerprint traces of this layer are keyed by (what every host computes)."""
    fd = os.open(layer, os.O_RDONLY)
    try:
        return trace_format.fingerprint(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def trace_file_name(layer: Path, host: str) -> str:
    """The name of the trace file ``host`` keeps for ``layer``."""
    return trace_format.file_name(layer_fingerprint(layer), host).decode()


def boot_script(seed: int = 7, think_ms: int = 1) -> list[str]:
    """qemu-io commands shaped like a boot: ~360 reads in 40 clusters, 4-128 KiB each."""
    rng = random.Random(seed)
    commands = []
    for _ in range(40):
        start = rng.randrange(0, 60 * MiB, 4096)
        for _ in range(9):
            length = rng.choice([4096, 4096, 16384, 16384, 65536, 131072])
            offset = min(start + rng.randrange(0, 512 * 1024, 4096), 64 * MiB - length)
            commands.append(f"read -P 0x42 {offset} {length}")
            if think_ms:
                commands.append(f"sleep {think_ms}")
    return commands


def replay_args(image: Path, commands: list[str]) -> list[str]:
    args = ["qemu-io", "--cache=none"]
    for command in commands:
        args += ["-c", command]
    return [*args, str(image)]


def replay(image: Path, commands: list[str]) -> None:
    result = subprocess.run(replay_args(image, commands), capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "verification failed" not in result.stdout


def wait_for(mnt: Path, path: str, predicate: Any, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        layer = layer_stats(mnt, path)
        if predicate(layer):
            return layer
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; layer stats: {layer}")
        time.sleep(0.1)


def recorded(layer: dict[str, Any]) -> bool:
    trace = layer.get("trace") or {}
    return trace.get("status") == "ready" and not trace.get("recording")


def prefetched(layer: dict[str, Any]) -> bool:
    return bool(layer.get("prefetch")) and not layer["prefetch"]["running"]


def record_one_boot(store: Path, mnt: Path, mount_factory: MountFactory,
                    *options: str) -> dict[str, Any]:
    mount = mount_factory(store, mnt, "allow_other", *options)
    overlay(store, "vm1.qcow2", "base.qcow2")
    replay(mnt / "vm1.qcow2", boot_script(think_ms=0))
    layer = wait_for(mnt, "base.qcow2", recorded)
    mount.unmount()
    return layer


def test_record_then_prefetch_the_next_boot(store: Path, mnt: Path,
                                            mount_factory: MountFactory) -> None:
    make_boot_base(store)
    first = record_one_boot(store, mnt, mount_factory)
    assert first["trace"]["boots"] == 1
    traces = sorted((store / ".scache" / "traces").iterdir())
    assert len(traces) == 1 and traces[0].name.startswith("fp-")
    assert traces[0].name == trace_file_name(store / "base.qcow2", socket.gethostname())
    assert 1000 < traces[0].stat().st_size < 64 * 1024  # 20 bytes per chunk

    drop_caches()
    mount = mount_factory(store, mnt, "allow_other")
    assert ".scache" not in os.listdir(mnt)
    assert not (mnt / ".scache").exists()
    overlay(store, "vm2.qcow2", "base.qcow2")
    replay(mnt / "vm2.qcow2", boot_script(think_ms=1))
    second = wait_for(mnt, "base.qcow2", prefetched)
    pf = second["prefetch"]
    assert pf["reason"] == "first boot" and pf["error"] is None
    assert pf["done_bytes"] == pf["total_bytes"] == first["trace"]["bytes"]
    # The store saw far fewer, larger requests for the same boot.
    # (the quarter is checked on the real guest: tests/test_guest_boot.py)
    assert second["store_reads"] * 3 <= first["store_reads"], (first, second)
    # Nearly all the boot's bytes came from prefetched chunks.
    assert pf["useful_chunks"] >= 0.9 * first["trace"]["chunks"], pf
    assert pf["useful_ratio"] >= 0.9
    assert "prefetch of base.qcow2 finished" in mount.log()


def test_a_trace_recorded_on_one_host_prefetches_on_another(
        store: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    make_boot_base(store)
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    host_a.mkdir()
    host_b.mkdir()
    record_one_boot(store, host_a, mount_factory, "host_id=host-a")
    mount_factory(store, host_b, "allow_other", "host_id=host-b")
    overlay(store, "vm2.qcow2", "base.qcow2")
    replay(host_b / "vm2.qcow2", boot_script())
    layer = wait_for(host_b, "base.qcow2", prefetched)
    assert layer["trace"]["hosts"] == 1 and layer["trace"]["status"] == "ready"
    assert layer["prefetch"]["useful_chunks"] > 0
    assert not layer["trace"]["recording"]  # a current trace exists: auto does not record
    names = [p.name for p in (store / ".scache" / "traces").iterdir()]
    assert names == [n for n in names if ".host-a." in n]


def test_storm_of_four_reads_the_base_once(store: Path, mnt: Path,
                                           mount_factory: MountFactory) -> None:
    make_boot_base(store)
    first = record_one_boot(store, mnt, mount_factory)
    drop_caches()
    mount_factory(store, mnt, "allow_other")
    for i in range(4):
        overlay(store, f"storm{i}.qcow2", "base.qcow2")
    script = boot_script(think_ms=0)
    procs = [subprocess.Popen(replay_args(mnt / f"storm{i}.qcow2", script),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(4)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and b"verification failed" not in out
    layer = wait_for(mnt, "base.qcow2", prefetched)
    working_set = first["trace"]["bytes"]
    assert layer["evictions"] == 0
    # Read once: the working set (plus gaps prefetch filled and qcow2 metadata).
    assert layer["store_bytes"] <= 1.5 * working_set, (layer["store_bytes"], working_set)
    requested = sum(int(c.split()[-1]) for c in script if c.startswith("read"))
    assert layer["hit_bytes"] + layer["miss_bytes"] >= 4 * requested  # all four were served


def test_a_layer_whose_sampled_bytes_changed_is_a_new_layer(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    base = make_boot_base(store)
    record_one_boot(store, mnt, mount_factory)
    before = layer_fingerprint(base)
    run("qemu-io", "-c", "write -P 0x43 0 64M", base)  # same size, new bytes everywhere
    assert layer_fingerprint(base) != before
    mount_factory(store, mnt, "allow_other")
    overlay(store, "vm2.qcow2", "base.qcow2")
    script = [c.replace("0x42", "0x43") for c in boot_script()]
    replay(mnt / "vm2.qcow2", script)  # never the old bytes
    layer = wait_for(mnt, "base.qcow2", recorded)
    assert layer["prefetch"] is None  # the old trace predicts other bytes: not used
    assert layer["trace"]["fingerprint"] == layer_fingerprint(base).hex()
    names = sorted(p.name for p in (store / ".scache" / "traces").iterdir())
    assert len(names) == 2 and trace_file_name(base, socket.gethostname()) in names


def test_a_changed_layer_is_detected_chunk_by_chunk_and_re_recorded(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    base = make_boot_base(store)
    record_one_boot(store, mnt, mount_factory)
    before = layer_fingerprint(base)
    # New bytes where the fingerprint does not look, but the boot reads: the same key;
    # the chunk digests catch it.
    script = boot_script()
    first = next(c for c in script if c.startswith("read"))
    _, _, _, offset, length = first.split()
    run("qemu-io", "-c", f"write -P 0x43 {offset} {length}", base)
    settle(base, 1800)  # changed after the boot was recorded, before this one
    assert layer_fingerprint(base) == before
    mount = mount_factory(store, mnt, "allow_other")
    overlay(store, "vm2.qcow2", "base.qcow2")
    changed = [first.replace("0x42", "0x43")] + [
        c.replace("-P 0x42 ", "") for c in script if c != first]
    replay(mnt / "vm2.qcow2", changed)  # never the old bytes
    layer = wait_for(mnt, "base.qcow2", lambda la: prefetched(la) and recorded(la))
    assert layer["prefetch"]["stale_chunks"] > 0
    # A mismatch stops the prefetch: it does not read the rest of a stale prediction.
    assert layer["prefetch"]["done_bytes"] < layer["prefetch"]["total_bytes"]
    assert layer["trace"]["status"] == "ready"  # re-recorded on the layer as it is now
    assert "stale" in mount.log()


def test_corrupt_trace_files_are_logged_and_ignored(store: Path, mnt: Path,
                                                    mount_factory: MountFactory) -> None:
    make_boot_base(store)
    record_one_boot(store, mnt, mount_factory)
    traces = store / ".scache" / "traces"
    good = next(traces.iterdir())
    ino = good.name.split(".")[0]
    data = bytearray(good.read_bytes())
    data[100] ^= 0x10
    (traces / f"{ino}.flipped.trace").write_bytes(bytes(data))
    (traces / f"{ino}.short.trace").write_bytes(good.read_bytes()[:50])
    good.unlink()
    mount = mount_factory(store, mnt, "allow_other",
                          allow=("ignoring trace file",))
    overlay(store, "vm2.qcow2", "base.qcow2")
    replay(mnt / "vm2.qcow2", boot_script(think_ms=0))
    layer = wait_for(mnt, "base.qcow2", recorded)  # nothing usable: it records afresh
    log = mount.log()
    assert "flipped.trace" in log and "checksum mismatch" in log
    assert "short.trace" in log and "truncated" in log
    assert layer["prefetch"] is None


def test_probes_are_not_boots(store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_boot_base(store)
    mount_factory(store, mnt, "allow_other")
    overlay(store, "vm1.qcow2", "base.qcow2")
    run("qemu-img", "info", "--backing-chain", mnt / "vm1.qcow2")
    qemu_io(mnt / "vm1.qcow2", "read -P 0x42 0 64k", cache="none")
    time.sleep(0.5)
    assert not (store / ".scache" / "traces").exists() or \
        not list((store / ".scache" / "traces").iterdir())
    assert layer_stats(mnt, "base.qcow2")["trace"]["status"] == "none"


def test_prefetch_at_mount_and_the_budget(store: Path, mnt: Path,
                                          mount_factory: MountFactory) -> None:
    make_boot_base(store)
    first = record_one_boot(store, mnt, mount_factory)
    mount_factory(store, mnt, "allow_other", "prefetch=mount")
    layer = wait_for(mnt, "base.qcow2", prefetched)
    assert layer["resident_bytes"] >= first["trace"]["bytes"]
    assert layer["prefetch"]["reason"] == "mount"
    run("fusermount3", "-u", mnt)
    time.sleep(0.5)
    small = mount_factory(store, mnt, "allow_other", "prefetch=mount", "cache_size=4M",
                          allow=("stopped at the cache budget",))
    layer = wait_for(mnt, "base.qcow2", prefetched)
    assert layer["prefetch"]["stopped_at_budget"]
    assert stats(mnt)["cache"]["used_bytes"] <= 4 * MiB
    assert "stopped at the cache budget" in small.log()


def test_format_1_traces_are_migrated_once_and_still_prefetch(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    base = make_boot_base(store)
    record_one_boot(store, mnt, mount_factory, "host_id=old")
    directory = store / ".scache" / "traces"
    (v2,) = directory.iterdir()
    recorded_trace = trace_format.decode(v2.read_bytes())
    # The same boots as scachefs wrote them before fingerprints: keyed by inode number.
    st = base.stat()
    from tests.test_traces import encode_v1
    v1 = directory / f"ino-{st.st_ino}.old.trace"
    v1.write_bytes(encode_v1(st.st_ino, st.st_size, recorded_trace.layer.mtime_ns, "old",
                             recorded_trace.boots, recorded_trace.chunk_size))
    v2.unlink()
    mount = mount_factory(store, mnt, "allow_other", "host_id=new")
    overlay(store, "vm2.qcow2", "base.qcow2")
    replay(mnt / "vm2.qcow2", boot_script())
    layer = wait_for(mnt, "base.qcow2", prefetched)
    assert layer["trace"]["status"] == "ready" and not layer["trace"]["recording"]
    assert layer["prefetch"]["useful_chunks"] > 0 and layer["prefetch"]["stale_chunks"] == 0
    assert sorted(p.name for p in directory.iterdir()) == [trace_file_name(base, "old")]
    migrated = trace_format.decode((directory / trace_file_name(base, "old")).read_bytes())
    assert migrated.boots == recorded_trace.boots and migrated.host == "old"
    assert migrated.path == "base.qcow2"
    assert "migrated trace file" in mount.log()


def test_a_base_copied_to_a_new_name_finds_its_traces(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_boot_base(store)
    record_one_boot(store, mnt, mount_factory, "host_id=h1")
    (store / "bases").mkdir()
    shutil.copyfile(store / "base.qcow2", store / "bases" / "copy.qcow2")  # new inode, mtime
    settle(store / "bases" / "copy.qcow2", 1800)
    (store / "base.qcow2").unlink()
    mount_factory(store, mnt, "allow_other", "host_id=h1")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "bases/copy.qcow2", "-F", "qcow2",
        store / "vm2.qcow2")
    replay(mnt / "vm2.qcow2", boot_script())
    layer = wait_for(mnt, "bases/copy.qcow2", lambda la: prefetched(la) and recorded(la))
    assert layer["prefetch"]["useful_chunks"] > 0 and layer["prefetch"]["stale_chunks"] == 0
    # Recorded on another mtime: the copy's first boot was prefetched and recorded once.
    assert layer["trace"]["status"] == "ready"


def trace_boots(store: Path) -> int:
    """Boots kept in the store's trace files (0 when there are none)."""
    directory = store / ".scache" / "traces"
    if not directory.exists():
        return 0
    return sum(len(trace_format.decode(p.read_bytes()).boots)
               for p in directory.glob("*.trace"))


def test_a_scan_of_the_base_is_not_a_boot(store: Path, mnt: Path, tmp_path: Path,
                                          mount_factory: MountFactory) -> None:
    """sha256sum or cp of a base through the mount reads it all, in order: not a boot."""
    make_boot_base(store)
    mount = mount_factory(store, mnt, "allow_other", "record=on")
    overlay(store, "vm1.qcow2", "base.qcow2")
    run("qemu-img", "info", mnt / "vm1.qcow2")  # the base is a layer of this mount
    for scan in (["sha256sum", mnt / "base.qcow2"], ["cp", mnt / "base.qcow2", tmp_path / "c"],
                 ["dd", f"if={mnt / 'base.qcow2'}", "of=/dev/null", "bs=1M", "iflag=direct"]):
        drop_caches()
        run(*scan)
        time.sleep(0.3)
        layer = layer_stats(mnt, "base.qcow2")
        assert layer["store_bytes"] >= 60 * MiB  # it did read the whole base through us
        assert layer["trace"]["status"] in ("none", "recording"), (scan, layer["trace"])
        assert trace_boots(store) == 0, scan
    assert mount.log().count("a scan, not a boot") == 3
    # A VM's boot is still one, even while a scan that started first is still open.
    drop_caches()
    fd = os.open(mnt / "base.qcow2", os.O_RDONLY)
    try:
        for offset in range(0, 8 * MiB, 128 << 10):
            assert len(os.pread(fd, 128 << 10, offset)) == 128 << 10
        replay(mnt / "vm1.qcow2", boot_script())
        os.pread(fd, 128 << 10, 8 * MiB)
    finally:
        os.close(fd)
    wait_for(mnt, "base.qcow2", recorded)
    assert trace_boots(store) == 1
    (path,) = (store / ".scache" / "traces").glob("*.trace")
    (boot,) = trace_format.decode(path.read_bytes()).boots
    assert 360 <= boot.requests < 400  # the replay's reads (and qemu's), not the scan's
    # record=on records every boot, but a scan after it neither adds a boot nor
    # replaces the real one.
    drop_caches()
    run("sha256sum", mnt / "base.qcow2")
    time.sleep(0.5)
    assert trace_boots(store) == 1
    assert layer_stats(mnt, "base.qcow2")["trace"]["boots"] == 1


def test_a_session_ends_at_the_boot_window(store: Path, mnt: Path,
                                           mount_factory: MountFactory) -> None:
    make_boot_base(store)
    mount_factory(store, mnt, "allow_other", "boot_window=2")
    overlay(store, "vm1.qcow2", "base.qcow2")
    started = time.monotonic()
    replay(mnt / "vm1.qcow2", boot_script(think_ms=10))  # reads for 4 s or more
    assert time.monotonic() - started > 3.5
    wait_for(mnt, "base.qcow2", recorded)
    (path,) = (store / ".scache" / "traces").glob("*.trace")
    (boot,) = trace_format.decode(path.read_bytes()).boots
    assert boot.duration_ms <= 2000, boot.duration_ms
    assert max(ms for _, ms, _ in boot.chunks) < 2000
    assert 64 <= boot.requests < 300  # the reads after the window are not in it
