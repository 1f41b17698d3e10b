#!/usr/bin/env python3
"""fio inside a real TCG guest on its own overlay (cache=none): the store vs the mount.

    .venv/bin/python bench/guest_fio.py [--runs 1]

Boots the test guest (tests/guest.py) from a fresh overlay of its base, once on
the store and once through a scachefs mount of that store, running the guest
job fio-randrw (4 KiB random read/write, O_DIRECT, QD16, 15 s, on a file of the
guest's root file system, i.e. in its overlay). Prints the guest's IOPS for both
and the daemon's READ/WRITE requests and CPU seconds during the mount's boot.
Under TCG the guest's CPU, not the disk, bounds the IOPS: the point is that the
mount costs the guest nothing. Needs root, qemu-system-x86_64, fio in the guest.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from procstat import cpu_seconds  # noqa: E402

from tests import guest  # noqa: E402


def iops(result: guest.BootResult) -> tuple[float, float]:
    job = json.loads(result.job_output())["jobs"][0]
    assert job["error"] == 0, job
    return job["read"]["iops"], job["write"]["iops"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="boots per side")
    args = parser.parse_args()
    image = guest.ensure_guest_image()
    work = Path(tempfile.mkdtemp(prefix="scachefs-guestfio-", dir="/var/tmp"))
    store, mnt = work / "store", work / "mnt"
    store.mkdir()
    mnt.mkdir()
    guest.place_base(image, store)
    rows = []
    try:
        for run in range(args.runs):
            for where in ("store", "mount"):
                name = f"vm-{where}-{run}.qcow2"
                guest.new_overlay(store, name)
                extra = {}
                if where == "mount":
                    subprocess.run([sys.executable, "-m", "scachefs", str(store), str(mnt)],
                                   check=True, cwd=REPO)
                    pid = json.loads(os.getxattr(mnt, "user.scachefs.stats"))["pid"]
                    cpu0 = cpu_seconds(pid)
                try:
                    result = guest.boot((mnt if where == "mount" else store) / name, image,
                                        cache="none", job="fio-randrw", timeout=900)
                    if where == "mount":
                        doc = json.loads(os.getxattr(mnt, "user.scachefs.stats"))
                        extra = {"daemon_cpu_s": round(cpu_seconds(pid) - cpu0, 2),
                                 "requests": doc["fuse"]["requests"],
                                 "daemon_io": doc["fuse"]["daemon_io"]}
                finally:
                    if where == "mount":
                        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
                read, write = iops(result)
                rows.append({"where": where, "run": run, "read_iops": read,
                             "write_iops": write, **extra})
                print(f"{where:<6} run {run}: read {read:7.0f} IOPS, write {write:7.0f} IOPS"
                      + (f"; daemon: {extra['daemon_cpu_s']} s CPU, READ "
                         f"{extra['requests'].get('READ', 0)} (the base), WRITE "
                         f"{extra['requests'].get('WRITE', 0)}, plain-file I/O "
                         f"{extra['daemon_io']}" if extra else ""), flush=True)
    finally:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    for side in ("read_iops", "write_iops"):
        store_v = sum(r[side] for r in rows if r["where"] == "store")
        mount_v = sum(r[side] for r in rows if r["where"] == "mount")
        print(f"{side}: mount / store = {mount_v / store_v:.2f}")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
