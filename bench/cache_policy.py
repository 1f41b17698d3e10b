"""Compare the "lru" and "s3fifo" policies of scachefs.chunkcache on boot-storm workloads.

No FUSE and no disk: the fill callable returns zeros, so only the cache logic is
measured.  Workloads are synthetic but shaped after the field notes: a Debian boot
reads about 45 MiB unique of a 350 MiB base, as ~720 chunks of 64 KiB touched by
~1,060 requests with a median of 16 KiB, and the same chunk set on every boot.

Scenarios (3 base layers, VMs spread evenly over them):

* ``storm``       N VMs boot, starts spread over 60 s, no other traffic;
* ``storm+scan``  the same storm while a 2 GiB layer is read sequentially in 1 MiB
                  requests (e.g. ``qemu-img convert``), overlapping the storm;
* ``wave/scan/wave``  N/2 VMs boot, then the 2 GiB scan runs alone, then N/2 more
                  VMs boot: does the base working set survive the scan?

"boot hit %" is the share of boot requests served entirely from memory;
"boot MiB from store" is what the base layers cost the store (the floor is one cold
read of the three working sets).  The script also times ``lookup()`` hits.

Run: ``python bench/cache_policy.py`` (``--quick`` for a smaller run).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scachefs.chunkcache import ChunkCache, LayerBuffer

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
CHUNK = 64 * KiB
BASE_SIZE = 350 * MiB
BOOT_CHUNKS = 720
BOOT_REQUESTS = 1060
BOOT_SECONDS = 20.0
SCAN_SIZE = 2 * GiB
SCAN_REQUEST = 1 * MiB
BUDGETS_MIB = (64, 128, 256, 512)
POLICIES = ("lru", "s3fifo")
# Boot request sizes: median 16 KiB, a tail of readahead-sized requests.
SIZE_WEIGHTS = {
    4 * KiB: 20,
    8 * KiB: 15,
    16 * KiB: 20,
    32 * KiB: 15,
    64 * KiB: 15,
    128 * KiB: 10,
    256 * KiB: 5,
}

_ZEROS = bytes(SCAN_REQUEST)


async def zero_fill(offset: int, length: int) -> bytes:
    """Stand-in for pread: the content does not matter for hit ratios."""
    return _ZEROS if length == len(_ZEROS) else bytes(length)


@dataclass(frozen=True, slots=True)
class Request:
    """One read at a point in simulated time."""

    when: float
    seq: int
    layer: int  # 0..2 = base layers, 3 = the scanned layer
    offset: int
    size: int


def boot_trace(rng: random.Random) -> list[tuple[int, int]]:
    """The (offset, size) requests of one boot: same list every boot of that base."""
    n_chunks = BASE_SIZE // CHUNK
    taken: set[int] = set()
    extents: list[tuple[int, int]] = []
    while len(taken) < BOOT_CHUNKS:
        length = min(BOOT_CHUNKS - len(taken), max(1, int(rng.expovariate(1 / 12))))
        start = rng.randrange(n_chunks - length)
        span = range(start - 1, start + length + 1)
        if any(c in taken for c in span):
            continue
        taken.update(range(start, start + length))
        extents.append((start, length))
    # Boots read roughly in file order with detours: shuffle extents a little.
    extents.sort()
    for i in range(len(extents) - 1):
        if rng.random() < 0.3:
            j = min(len(extents) - 1, i + rng.randrange(1, 8))
            extents[i], extents[j] = extents[j], extents[i]
    sizes = list(SIZE_WEIGHTS)
    weights = list(SIZE_WEIGHTS.values())
    requests: list[tuple[int, int]] = []
    visited: list[tuple[int, int]] = []
    for start, length in extents:
        end = (start + length) * CHUNK
        for chunk in range(start, start + length):
            size = rng.choices(sizes, weights)[0]
            offset = chunk * CHUNK + rng.randrange(0, CHUNK, 4 * KiB)
            size = min(size, end - offset)
            requests.append((offset, size))
            visited.append((offset, size))
    # The rest re-read places already read (metadata, libraries opened twice).
    while len(requests) < BOOT_REQUESTS:
        offset, size = rng.choice(visited)
        pos = rng.randrange(len(requests) // 2, len(requests) + 1)
        requests.insert(pos, (offset, min(size, rng.choices(sizes, weights)[0])))
    return requests


def boot_requests(
    traces: list[list[tuple[int, int]]], starts: list[float], seq0: int
) -> list[Request]:
    """Requests of VMs booting at the given times, VM i on base i % 3."""
    out: list[Request] = []
    seq = seq0
    for vm, start in enumerate(starts):
        base = vm % len(traces)
        trace = traces[base]
        step = BOOT_SECONDS / len(trace)
        for j, (offset, size) in enumerate(trace):
            out.append(Request(start + j * step, seq, base, offset, size))
            seq += 1
    return out


def scan_requests(start: float, mib_per_s: float, seq0: int) -> list[Request]:
    """A one-pass sequential read of the whole scan layer."""
    step = SCAN_REQUEST / (mib_per_s * MiB)
    return [
        Request(start + i * step, seq0 + i, 3, i * SCAN_REQUEST, SCAN_REQUEST)
        for i in range(SCAN_SIZE // SCAN_REQUEST)
    ]


def scenarios(
    traces: list[list[tuple[int, int]]], n_vms: int, rng: random.Random
) -> dict[str, list[Request]]:
    """The three request streams, each sorted by simulated time."""
    storm_starts = sorted(rng.uniform(0, 60) for _ in range(n_vms))
    storm = boot_requests(traces, storm_starts, 0)
    wave1 = sorted(rng.uniform(0, 10) for _ in range(n_vms // 2))
    wave2 = sorted(rng.uniform(120, 130) for _ in range(n_vms - n_vms // 2))
    result = {
        "storm": storm,
        "storm+scan": storm + scan_requests(5.0, 50.0, len(storm)),
        "wave/scan/wave": boot_requests(traces, wave1 + wave2, 0)
        + scan_requests(40.0, 100.0, 10**9),
    }
    for reqs in result.values():
        reqs.sort(key=lambda r: (r.when, r.seq))
    return result


@dataclass(slots=True)
class Outcome:
    """What one (scenario, budget, policy) run produced."""

    boot_hit_pct: float
    boot_store_mib: float
    all_hit_pct: float
    store_mib: float
    evictions: int
    seconds: float


async def simulate(requests: list[Request], budget: int, policy: str) -> Outcome:
    """Replay a request stream through a fresh cache, one request at a time."""
    cache = ChunkCache(budget, chunk_size=CHUNK, policy=policy)
    layers: list[LayerBuffer] = [cache.layer(("base", b), BASE_SIZE, zero_fill) for b in range(3)]
    layers.append(cache.layer("scan", SCAN_SIZE, zero_fill))
    t0 = time.perf_counter()
    for req in requests:
        await cache.read(layers[req.layer], req.offset, req.size)
        assert cache.used_bytes <= cache.budget_bytes
    seconds = time.perf_counter() - t0
    bases = layers[:3]
    boot_hits = sum(b.stats.hit_ops for b in bases)
    boot_ops = boot_hits + sum(b.stats.miss_ops for b in bases)
    total = cache.total
    return Outcome(
        boot_hit_pct=100.0 * boot_hits / boot_ops,
        boot_store_mib=sum(b.stats.store_bytes for b in bases) / MiB,
        all_hit_pct=100.0 * total.hit_ratio(),
        store_mib=total.store_bytes / MiB,
        evictions=total.evictions,
        seconds=seconds,
    )


def time_lookups(policy: str) -> dict[str, float]:
    """Nanoseconds per lookup() hit at random offsets of a resident 64 MiB layer, and
    for reference the same slices taken straight from one bytes object."""
    rng = random.Random(7)
    size = 64 * MiB
    raw = rng.randbytes(size)  # real pages, unlike bytes(size), so copies cost what they do

    async def fill(offset: int, length: int) -> bytes:
        return raw[offset : offset + length]

    cache = ChunkCache(128 * MiB, chunk_size=CHUNK, policy=policy)
    layer = cache.layer("hot", size, fill)
    trio.run(cache.prefetch, layer, 0, size)
    results: dict[str, float] = {}
    cases = {
        "4 KiB hit": (4 * KiB, [rng.randrange(0, size - 4 * KiB, 4 * KiB) for _ in range(200_000)]),
        "1 MiB hit, aligned": (MiB, [rng.randrange(0, size - MiB, MiB) for _ in range(4_000)]),
        "1 MiB hit, unaligned": (
            MiB,
            [rng.randrange(0, size - 2 * MiB, 4 * KiB) + 512 for _ in range(4_000)],
        ),
    }
    lookup = cache.lookup
    for name, (n, offsets) in cases.items():
        samples = []
        for _ in range(5):
            t0 = time.perf_counter_ns()
            for off in offsets:
                lookup(layer, off, n)
            samples.append((time.perf_counter_ns() - t0) / len(offsets))
        results[name] = min(samples)
        samples = []
        for _ in range(5):
            t0 = time.perf_counter_ns()
            for off in offsets:
                _ = raw[off : off + n]
            samples.append((time.perf_counter_ns() - t0) / len(offsets))
        results[name + " (bytes slice only)"] = min(samples)
    return results


def main() -> None:
    """Build the workloads, replay them for every budget and policy, print tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=48, help="VMs booting (default 48)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="12 VMs, budgets 64 and 256 MiB")
    args = parser.parse_args()
    n_vms = 12 if args.quick else args.vms
    budgets = (64, 256) if args.quick else BUDGETS_MIB

    rng = random.Random(args.seed)
    traces = [boot_trace(rng) for _ in range(3)]
    unique = [
        len({c for o, s in t for c in range(o // CHUNK, (o + s - 1) // CHUNK + 1)}) for t in traces
    ]
    sizes = sorted(s for t in traces for _, s in t)
    floor_mib = sum(unique) * CHUNK / MiB
    print(
        f"boot traces: {[len(t) for t in traces]} requests, {unique} chunks of 64 KiB, "
        f"median request {statistics.median(sizes) / KiB:.0f} KiB; "
        f"{n_vms} VMs over 3 bases; store floor for the bases = {floor_mib:.0f} MiB"
    )
    streams = scenarios(traces, n_vms, rng)

    header = (
        f"| {'scenario':<15} | {'budget':>7} | {'policy':<6} | {'boot hit %':>10} "
        f"| {'boot MiB from store':>19} | {'all hit %':>9} | {'store MiB':>9} "
        f"| {'evictions':>9} | {'sim s':>5} |"
    )
    print()
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, requests in streams.items():
        for budget in budgets:
            for policy in POLICIES:
                out = trio.run(simulate, requests, budget * MiB, policy)
                print(
                    f"| {name:<15} | {budget:>3} MiB | {policy:<6} | {out.boot_hit_pct:>10.1f} "
                    f"| {out.boot_store_mib:>19.0f} | {out.all_hit_pct:>9.1f} "
                    f"| {out.store_mib:>9.0f} | {out.evictions:>9} | {out.seconds:>5.1f} |",
                    flush=True,
                )

    print()
    print("| lookup() hit cost    | policy | ns per call | bytes slice alone, ns |")
    print("|----------------------|--------|-------------|-----------------------|")
    for policy in POLICIES:
        timing = time_lookups(policy)
        for case in ("4 KiB hit", "1 MiB hit, aligned", "1 MiB hit, unaligned"):
            print(
                f"| {case:<20} | {policy:<6} | {timing[case]:>11.0f} "
                f"| {timing[case + ' (bytes slice only)']:>21.0f} |"
            )
    print(f"\npython {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
