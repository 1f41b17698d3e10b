"""Memory under a read storm: the daemon stays inside its budget and every reader gets its data.

32 concurrent O_DIRECT readers (qemu-io --cache=none through overlays) over three bases
whose combined working set is more than twice the cache budget: eviction runs all the
time, readers join each other's in-flight fills, and the daemon's resident memory
(sampled from /proc every 0.1 s) must stay under budget + a fixed overhead.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from scachefs.traces import decode as decode_trace
from tests.conftest import MountFactory
from tests.mounting import drop_caches, run, settle
from tests.test_boot_traces import (
    boot_script,
    make_boot_base,
    replay,
    trace_file_name,
    wait_for,
)
from tests.test_shadow_cache import layer_stats, overlay, stats

MiB = 1 << 20
BUDGET = 64 * MiB
OVERHEAD = 64 * MiB  # the fixed allowance above budget + RSS before the storm
BASES = 3
SEGMENTS = 12  # 4 MiB segments of data per base: 48 MiB each, 144 MiB in all
SEGMENT = 4 * MiB
READERS = 32
ROUNDS = 2


def pattern(base: int, segment: int) -> int:
    return 0x20 * (base + 1) + segment


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Sample a process's VmRSS every `interval` seconds in a thread; keep the peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append(rss_bytes(self.pid))

    @property
    def peak(self) -> int:
        return max(self.samples)


def make_bases(store: Path) -> None:
    """Three 64 MiB qcow2 bases, 48 MiB of data each, one pattern per 4 MiB segment."""
    for b in range(BASES):
        base = store / f"base{b}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
        writes = []
        for s in range(SEGMENTS):
            writes += ["-c", f"write -P {pattern(b, s):#x} {s * SEGMENT} {SEGMENT}"]
        run("qemu-io", *writes, base)


def reader_commands(k: int) -> tuple[int, list[str]]:
    """Reader k: base k % 3, all 12 segments in 1 MiB reads, starting at a rotated segment.

    Readers k and k + 3 start at the same place of the same base at the same time, so they
    miss the same chunks together: one fills, the other joins the flight.
    """
    b = k % BASES
    start = (k // 6) % SEGMENTS
    commands = []
    for i in range(SEGMENTS):
        s = (start + i) % SEGMENTS
        for m in range(SEGMENT // MiB):
            commands.append(f"read -P {pattern(b, s):#x} {s * SEGMENT + m * MiB} {MiB}")
    return b, commands


def storm(mnt: Path) -> None:
    """All readers at once; each must read all its 48 MiB with the right patterns."""
    procs: list[tuple[int, subprocess.Popen[bytes]]] = []
    for k in range(READERS):
        _, commands = reader_commands(k)
        args = ["qemu-io", "-r", "--cache=none"]
        for command in commands:
            args += ["-c", command]
        procs.append((k, subprocess.Popen([*args, str(mnt / f"vm{k:02}.qcow2")],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    failures = []
    for k, proc in procs:
        out, _ = proc.communicate(timeout=300)
        text = out.decode(errors="replace")
        reads = text.count("read 1048576/1048576 bytes")
        if proc.returncode != 0 or "verification failed" in text or \
                reads != SEGMENTS * SEGMENT // MiB:
            failures.append(f"reader {k}: rc={proc.returncode} reads={reads}\n{text[-2000:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_32_readers_over_3_bases_stay_within_the_budget(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_bases(store)
    for k in range(READERS):
        overlay(store, f"vm{k:02}.qcow2", f"base{k % BASES}.qcow2")
    drop_caches()
    mount = mount_factory(store, mnt, "allow_other", "cache_size=64M")
    stats(mnt)  # the daemon answers; its scan has run
    time.sleep(0.5)
    rss_before = rss_bytes(mount.pid)
    started = time.monotonic()
    with RssSampler(mount.pid) as sampler:
        for _ in range(ROUNDS):  # the second round starts with a full cache
            storm(mnt)
    seconds = time.monotonic() - started

    doc = stats(mnt)
    cache, totals = doc["cache"], doc["totals"]
    limit = BUDGET + OVERHEAD + rss_before
    print(f"\n{READERS} readers x {ROUNDS} rounds, "
          f"{ROUNDS * READERS * SEGMENTS * SEGMENT >> 20} MiB verified in "
          f"{seconds:.1f} s; RSS before {rss_before >> 20} MiB, peak {sampler.peak >> 20} MiB "
          f"({len(sampler.samples)} samples), limit {limit >> 20} MiB; used "
          f"{cache['used_bytes'] >> 20} MiB of {cache['budget_bytes'] >> 20} MiB; evictions "
          f"{totals['evictions']}, joins {totals['singleflight_joins']}, store reads "
          f"{totals['store_reads']} ({totals['store_bytes'] >> 20} MiB)")
    assert len(sampler.samples) >= 10, sampler.samples
    assert sampler.peak <= limit, (sampler.peak, limit, sampler.samples)
    assert cache["budget_bytes"] == BUDGET
    assert 0 < cache["used_bytes"] <= BUDGET
    assert totals["evictions"] > 0
    # Readers waited on fills already in flight (single flight) while eviction ran, and
    # still every one of them got every byte right (checked above).
    assert totals["singleflight_joins"] > 0
    assert totals["fill_errors"] == 0
    served = totals["hit_bytes"] + totals["miss_bytes"]
    assert served >= ROUNDS * READERS * SEGMENTS * SEGMENT, totals
    layers = {layer["path"]: layer for layer in doc["layers"]}
    for b in range(BASES):
        layer = layers[f"base{b}.qcow2"]
        assert layer["attached"] and layer["evictions"] > 0, layer
        assert layer["resident_bytes"] <= BUDGET
    assert sum(layer["resident_bytes"] for layer in layers.values()) == cache["used_bytes"]


def test_pins_stay_within_90_percent_and_other_layers_still_cache(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    # A boot whose working set (~30 MiB, recorded with a large budget) is far larger
    # than the 8 MiB budget of the next mount.
    make_boot_base(store)
    mount_factory(store, mnt, "allow_other")
    overlay(store, "vm1.qcow2", "base.qcow2")
    replay(mnt / "vm1.qcow2", boot_script(think_ms=0))
    recorded = wait_for(mnt, "base.qcow2", lambda la: la["trace"]["status"] == "ready"
                        and not la["trace"]["recording"])
    assert recorded["trace"]["bytes"] > 8 * MiB
    run("fusermount3", "-u", mnt)
    time.sleep(0.5)

    other = store / "other.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", other, "16M")
    run("qemu-io", "-c", "write -P 0x77 0 4M", other)
    settle(other)  # written long before this boot, as bases are: cached when read
    overlay(store, "vm-other.qcow2", "other.qcow2")
    overlay(store, "vm2.qcow2", "base.qcow2")
    overlay(store, "vm-hold.qcow2", "base.qcow2")
    mount_factory(store, mnt, "allow_other", "cache_size=8M")
    budget = 8 * MiB
    args = ["qemu-io", "-r", "--cache=none", "-c", "sleep 30000"]
    # The boot stays open (a running VM keeps its disk open) while it reads its working set.
    with subprocess.Popen([*args, str(mnt / "vm-hold.qcow2")], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as vm:
        try:
            time.sleep(0.5)
            replay(mnt / "vm2.qcow2", boot_script())
            wait_for(mnt, "base.qcow2",
                     lambda la: bool(la["prefetch"]) and not la["prefetch"]["running"])
            pinned: Any = stats(mnt)["cache"]["pinned_bytes"]
            # Another base, read while the first one's boot is open, must still be cached.
            for _ in range(2):
                run("qemu-io", "-r", "--cache=none", "-c", "read -P 0x77 0 4M",
                    mnt / "vm-other.qcow2")
            other_layer = layer_stats(mnt, "other.qcow2")
        finally:
            vm.kill()
    outcome = (pinned, other_layer["resident_bytes"], other_layer["hit_bytes"])
    assert pinned <= 0.9 * budget and other_layer["resident_bytes"] > 0 \
        and other_layer["hit_bytes"] > 0, outcome


def test_the_boots_a_host_keeps_in_memory_are_bounded_like_its_file(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    base = make_boot_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    mount = mount_factory(store, mnt, "allow_other", "record=on", "host_id=h1")
    trace = store / ".scache" / "traces" / trace_file_name(base, "h1")
    for n in range(1, 11):  # more boots than the 8 a trace file keeps
        replay(mnt / "vm.qcow2", boot_script(seed=n, think_ms=0))
        deadline = time.monotonic() + 20
        while mount.log().count("recorded a boot of base.qcow2") < n:
            assert time.monotonic() < deadline, mount.log()
            time.sleep(0.1)
    on_file = len(decode_trace(trace.read_bytes()).boots)
    in_memory = layer_stats(mnt, "base.qcow2")["trace"]["boots"]
    assert on_file == 8
    assert in_memory == on_file, (in_memory, on_file)
