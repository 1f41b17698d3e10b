#!/usr/bin/env python3
"""The VMs' own I/O: fio on a plain file (a top overlay) through the mount vs the store.

    .venv/bin/python bench/datapath.py [--size-mib 1024] [--runtime 8] [--mount-options O]
                                       [--json out.json]

Fills a file with random data on the store, mounts scachefs over the store and
runs each fio workload (``--direct=1``) on the store's file and then on the
same file through the mount, in the same run. For each workload it prints IOPS
or MB/s for both, their ratio, the daemon's CPU seconds during the run and the
READ, WRITE and GETXATTR requests that reached the daemon. With kernel
passthrough the daemon should see none of the reads and writes.

Targets (issue 11): >= 0.9x the store on every workload except 4 KiB random
write with 4 psync jobs (reported against one writer: the kernel serialises
passthrough writes to one inode), and daemon CPU under 1% of the run time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from procstat import cpu_seconds

WORKLOADS = [  # label, rw, bs, ioengine, iodepth, numjobs
    ("4k randread psync x4", "randread", "4k", "psync", 1, 4),
    ("4k randread libaio QD32", "randread", "4k", "libaio", 32, 1),
    ("4k randwrite libaio QD32", "randwrite", "4k", "libaio", 32, 1),
    ("4k randwrite psync x1", "randwrite", "4k", "psync", 1, 1),
    ("4k randwrite psync x4", "randwrite", "4k", "psync", 1, 4),
    ("1M seq read QD4", "read", "1M", "libaio", 4, 1),
    ("1M seq write QD4", "write", "1M", "libaio", 4, 1),
]
EXEMPT = "4k randwrite psync x4"  # compared with one writer, see the docstring


def sh(*args: str | os.PathLike[str]) -> str:
    return subprocess.run([os.fspath(a) for a in args], check=True, capture_output=True,
                          text=True).stdout


def fio(path: Path, rw: str, bs: str, engine: str, depth: int, jobs: int, runtime: int,
        size: int) -> dict[str, float]:
    out = sh("fio", "--name=dp", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
             f"--ioengine={engine}", f"--iodepth={depth}", f"--numjobs={jobs}",
             "--direct=1", f"--size={size}", "--time_based", f"--runtime={runtime}",
             "--group_reporting", "--output-format=json", "--randrepeat=0", "--norandommap",
             "--verify_state_save=0")
    job = json.loads(out)["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return {"iops": side["iops"], "mb_per_s": side["bw_bytes"] / 1e6}



def requests(mnt: Path) -> dict[str, int]:
    doc = json.loads(os.getxattr(mnt, "user.scachefs.stats"))
    counts: dict[str, int] = doc["fuse"]["requests"]
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runtime", type=int, default=8, help="seconds per fio run")
    parser.add_argument("--mount-options", default="",
                        help="extra scachefs -o options, e.g. passthrough=off")
    parser.add_argument("--dir", type=Path, help="where to make the store (default: /var/tmp)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    for tool in ("fio", "fusermount3"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (make setup installs it)")
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="scachefs-datapath-", dir=args.dir or "/var/tmp"))
    store, mnt = work / "store", work / "mnt"
    store.mkdir()
    mnt.mkdir()
    disk = store / "vm-disk.raw"
    results: dict[str, Any] = {"size_bytes": size, "runtime_s": args.runtime,
                               "mount_options": args.mount_options, "workloads": {}}
    mounted = False
    try:
        with open(disk, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
        options = ",".join(o for o in ("allow_other", args.mount_options) if o)
        sh(sys.executable, "-m", "scachefs", store, mnt, "-o", options)
        mounted = True
        doc = json.loads(os.getxattr(mnt, "user.scachefs.stats"))
        pid = doc["pid"]
        results["passthrough"] = doc["fuse"]["passthrough"]
        results["passthrough_off"] = doc["fuse"]["passthrough_off"]
        for label, rw, bs, engine, depth, jobs in WORKLOADS:
            base = fio(disk, rw, bs, engine, depth, jobs, args.runtime, size)
            before, cpu0 = requests(mnt), cpu_seconds(pid)
            ours = fio(mnt / disk.name, rw, bs, engine, depth, jobs, args.runtime, size)
            after, cpu1 = requests(mnt), cpu_seconds(pid)
            key = "iops" if bs == "4k" else "mb_per_s"
            results["workloads"][label] = {
                "store": base, "mount": ours, "metric": key,
                "ratio": round(ours[key] / base[key], 3),
                "daemon_cpu_s": round(cpu1 - cpu0, 3),
                "daemon_cpu_share": round((cpu1 - cpu0) / args.runtime, 4),
                "requests": {op: after.get(op, 0) - before.get(op, 0)
                             for op in ("READ", "WRITE", "GETXATTR")}}
    finally:
        if mounted:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)

    mode = "kernel passthrough" if results["passthrough"] else (
        f"daemon path ({results['passthrough_off']})")
    print(f"fio --direct=1 on a {args.size_mib} MiB file, {args.runtime} s per run, "
          f"mount: {mode}\n")
    print(f"{'workload':<26}{'store':>14}{'mount':>14}{'ratio':>7}{'daemon CPU':>12}"
          f"{'READ':>9}{'WRITE':>9}{'GETXATTR':>9}")
    one_writer = results["workloads"]["4k randwrite psync x1"]
    for label, row in results["workloads"].items():
        key = row["metric"]
        unit = "IOPS" if key == "iops" else "MB/s"
        req = row["requests"]
        print(f"{label:<26}{row['store'][key]:>9.0f} {unit}{row['mount'][key]:>9.0f} {unit}"
              f"{row['ratio']:>7.2f}{row['daemon_cpu_share'] * 100:>11.2f}%"
              f"{req['READ']:>9}{req['WRITE']:>9}{req['GETXATTR']:>9}")
    x4 = results["workloads"][EXEMPT]
    print(f"\n{EXEMPT} through the mount vs one writer through the mount: "
          f"{x4['mount']['iops'] / one_writer['mount']['iops']:.2f}x")
    met = all(row["ratio"] >= 0.9 for label, row in results["workloads"].items()
              if label != EXEMPT)
    cpu = all(row["daemon_cpu_share"] < 0.01 for row in results["workloads"].values())
    print(f"target >= 0.9x the store (all but {EXEMPT}): {'met' if met else 'MISSED'}")
    print(f"target daemon CPU < 1% of the run time: {'met' if cpu else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
