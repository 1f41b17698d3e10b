"""Boot sessions in memory: what counts as a boot, a scan, and the end of the window."""

from __future__ import annotations

import random

from scachefs.recorder import BootSession

KiB, MiB = 1 << 10, 1 << 20
CS = 16 * KiB


def session(reads: list[tuple[int, int]], *, size: int = 128 * MiB,
            window: float = 120.0, step: float = 0.001) -> BootSession:
    s = BootSession(CS, size, now=0.0, window=window)
    for i, (offset, length) in enumerate(reads):
        s.note(offset, length, now=i * step)
    return s


def test_a_sequential_read_of_the_whole_file_is_a_scan() -> None:
    s = session([(o, MiB) for o in range(0, 64 * MiB, MiB)] * 2)  # 128 reads of 1 MiB
    assert s.is_scan() and not s.is_boot()
    assert "a scan, not a boot" in s.why_not_boot()


def test_readahead_out_of_order_is_still_a_scan() -> None:
    reads = []
    for o in range(0, 32 * MiB, 256 * KiB):  # pairs of 128K requests, swapped
        reads += [(o + 128 * KiB, 128 * KiB), (o, 128 * KiB)]
    assert session(reads).is_scan()


def test_a_partial_scan_from_the_middle_is_a_scan() -> None:
    assert session([(40 * MiB + i * 128 * KiB, 128 * KiB) for i in range(100)]).is_scan()


def test_a_boot_shaped_session_is_a_boot() -> None:
    rng = random.Random(7)
    reads = []
    for _ in range(40):  # 40 clusters of 9 reads, like tests/test_boot_traces.boot_script
        start = rng.randrange(0, 60 * MiB, 4096)
        for _ in range(9):
            reads.append((start + rng.randrange(0, 512 * KiB, 4096),
                          rng.choice([4096, 16384, 65536, 131072])))
    s = session(reads)
    assert not s.is_scan() and s.is_boot()


def test_a_boot_that_reads_in_order_but_sparsely_is_a_boot() -> None:
    # Every read continues near the previous one, but it skips most of its span.
    s = session([(i * 2 * MiB, 64 * KiB) for i in range(64)], size=256 * MiB)
    assert not s.is_scan() and s.is_boot()


def test_a_probe_is_neither() -> None:
    s = session([(0, 4096)] * 3)
    assert not s.is_boot() and "too few reads" in s.why_not_boot()


def test_reads_after_the_window_are_not_noted() -> None:
    s = session([(i * MiB, 4096) for i in range(100)], window=0.05, step=0.001)
    assert s.requests == 50 and max(s.first_ms.values()) < 50
    assert s.duration_ms <= 50
