#!/usr/bin/env python3
"""Hot-read benchmark: a cached backing layer read through the mount vs the store's page cache.

    .venv/bin/python bench/hot_read.py [--size-mib 512] [--runtime 10] [--json out.json]

Builds a store with a raw base and a qcow2 overlay naming it (so the base is a
backing layer), mounts scachefs, warms the layer's buffer with one O_DIRECT pass,
then runs fio: 1 MiB sequential O_DIRECT reads and 4 KiB random O_DIRECT reads at
queue depth 8 through the mount, and the same reads of the store file from the
page cache (buffered, warmed) as the baseline. Prints throughput, IOPS, ratios
and the daemon's RSS over the bytes it caches. Needs root, fio and qemu-img.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from procstat import cpu_seconds, status_bytes


def sh(*args: str | os.PathLike[str]) -> str:
    return subprocess.run([os.fspath(a) for a in args], check=True, capture_output=True,
                          text=True).stdout


def fio(path: Path, rw: str, bs: str, iodepth: int, direct: bool, runtime: int,
        size: int) -> dict[str, float]:
    out = sh("fio", "--name=hot", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
             f"--iodepth={iodepth}", "--ioengine=libaio" if iodepth > 1 else "--ioengine=psync",
             f"--direct={int(direct)}", f"--size={size}", "--time_based",
             f"--runtime={runtime}", "--readonly", "--output-format=json",
             "--randrepeat=0", "--norandommap")
    job = json.loads(out)["jobs"][0]["read"]
    return {"mb_per_s": job["bw_bytes"] / 1e6, "iops": job["iops"],
            "lat_us_p50": job["clat_ns"]["percentile"].get("50.000000", 0) / 1000}




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="size of the base layer")
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    parser.add_argument("--chunk-size", default="16K", help="scachefs chunk_size option")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    for tool in ("fio", "qemu-img", "fusermount3"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (make setup installs it)")
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="scachefs-bench-"))
    store, mnt = work / "store", work / "mnt"
    store.mkdir()
    mnt.mkdir()
    results: dict[str, Any] = {"size_bytes": size, "runtime_s": args.runtime}
    mounted = False
    try:
        with open(store / "base.raw", "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        old = time.time() - 3600  # a base written long before the VMs boot: scachefs
        os.utime(store / "base.raw", (old, old))  # caches nothing under a fresh identity
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
           store / "vm.qcow2")
        sh(sys.executable, "-m", "scachefs", store, mnt,
           "-o", f"cache_size={args.size_mib + 64}M,chunk_size={args.chunk_size}")
        mounted = True
        sh("qemu-img", "info", mnt / "vm.qcow2")  # opens the overlay: base is now a layer
        start = time.monotonic()
        sh("dd", f"if={mnt / 'base.raw'}", "of=/dev/null", "bs=1M", "iflag=direct")
        results["warm_seconds"] = round(time.monotonic() - start, 3)
        sh("dd", f"if={store / 'base.raw'}", "of=/dev/null", "bs=1M")  # warm baseline
        doc = json.loads(os.getxattr(mnt, "user.scachefs.stats"))
        pid = doc["pid"]
        rows = [("1 MiB seq, O_DIRECT, QD1", "read", "1M", 1),
                ("4 KiB rand, O_DIRECT, QD8", "randread", "4k", 8)]
        for label, rw, bs, depth in rows:
            cpu0 = cpu_seconds(pid)
            ours = fio(mnt / "base.raw", rw, bs, depth, True, args.runtime, size)
            ours["daemon_cpu_us_per_request"] = round(
                (cpu_seconds(pid) - cpu0) / (ours["iops"] * args.runtime) * 1e6, 2)
            base = fio(store / "base.raw", rw, bs, depth, False, args.runtime, size)
            results[label] = {"scachefs": ours, "store_page_cache": base,
                              "ratio": round(ours["mb_per_s"] / base["mb_per_s"], 3)}
        doc = json.loads(os.getxattr(mnt, "user.scachefs.stats"))
        cached = doc["cache"]["used_bytes"]
        rss = status_bytes(pid)
        results.update(cached_bytes=cached, daemon_rss_bytes=rss,
                       rss_minus_cached_mib=round((rss - cached) / 2**20, 1),
                       store_bytes=doc["totals"]["store_bytes"],
                       hit_ratio=doc["totals"]["hit_ratio"])
    finally:
        if mounted:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)

    print(f"hot reads of a cached {args.size_mib} MiB layer, chunk_size {args.chunk_size} "
          f"({args.runtime} s per run)\n")
    print(f"{'workload':<28}{'scachefs':>22}{'store page cache':>22}{'ratio':>8}")
    for label in ("1 MiB seq, O_DIRECT, QD1", "4 KiB rand, O_DIRECT, QD8"):
        row = results[label]
        fmt = "{mb_per_s:8.0f} MB/s {iops:7.0f} IOPS"
        print(f"{label:<28}{fmt.format(**row['scachefs']):>22}"
              f"{fmt.format(**row['store_page_cache']):>22}{row['ratio']:>8.2f}")
    for label in ("1 MiB seq, O_DIRECT, QD1", "4 KiB rand, O_DIRECT, QD8"):
        print(f"daemon CPU per request, {label}: "
              f"{results[label]['scachefs']['daemon_cpu_us_per_request']} us")
    print(f"\ncache warm-up (one O_DIRECT pass): {results['warm_seconds']} s; "
          f"store bytes read: {results['store_bytes'] >> 20} MiB")
    print(f"daemon RSS {results['daemon_rss_bytes'] >> 20} MiB, cached "
          f"{results['cached_bytes'] >> 20} MiB, RSS - cached = "
          f"{results['rss_minus_cached_mib']} MiB")
    targets = [("1 MiB hot reads >= 1.5 GB/s",
                results["1 MiB seq, O_DIRECT, QD1"]["scachefs"]["mb_per_s"] >= 1500),
               ("4 KiB QD8 >= 2x pyfuse3's 32,368 IOPS (issue 11)",
                results["4 KiB rand, O_DIRECT, QD8"]["scachefs"]["iops"] >= 2 * 32368),
               ("RSS <= cached + 64 MiB", results["rss_minus_cached_mib"] <= 64)]
    for name, ok in targets:
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
