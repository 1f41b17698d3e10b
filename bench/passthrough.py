#!/usr/bin/env python3
"""Passthrough throughput: 1 MiB sequential writes and reads of a plain file, mount vs store.

    .venv/bin/python bench/passthrough.py [--size-mib 1024]

A plain file is not a backing layer, so this measures the passthrough path
(worker-thread pread/pwrite) that writable top overlays use. Writes end with
fsync; reads are cold (page caches dropped) and O_DIRECT through the mount so
every request reaches the daemon. Needs root and fio.
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


def fio(path: Path, rw: str, size_mib: int, direct: bool) -> float:
    """MB/s of one fio job."""
    out = subprocess.run(
        ["fio", "--name=pt", f"--filename={path}", f"--rw={rw}", "--bs=1M",
         f"--size={size_mib}M", "--ioengine=psync", f"--direct={int(direct)}",
         "--end_fsync=1", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out)["jobs"][0]
    side = "write" if "write" in rw else "read"
    return float(job[side]["bw_bytes"]) / 1e6


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    if shutil.which("fio") is None:
        sys.exit("fio is missing (make setup installs it)")
    work = Path(tempfile.mkdtemp(prefix="scachefs-bench-", dir="/var/tmp"))
    store, mnt = work / "store", work / "mnt"
    store.mkdir()
    mnt.mkdir()
    rows = []
    try:
        subprocess.run([sys.executable, "-m", "scachefs", str(store), str(mnt)], check=True)
        try:
            for label, target in (("store", store), ("scachefs", mnt)):
                write = fio(target / f"{label}.dat", "write", args.size_mib, False)
                drop_caches()
                read = fio(target / f"{label}.dat", "read", args.size_mib, label == "scachefs")
                rows.append((label, write, read))
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"1 MiB sequential I/O of a {args.size_mib} MiB plain file (psync, QD1)\n")
    print(f"{'path':<10}{'write+fsync MB/s':>18}{'cold read MB/s':>16}")
    for label, write, read in rows:
        print(f"{label:<10}{write:>18.0f}{read:>16.0f}")
    (_, sw, sr), (_, mw, mr) = rows
    print(f"{'ratio':<10}{mw / sw:>18.2f}{mr / sr:>16.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
