"""``python -m scachefs.demo`` (``make demo``): scachefs over a small image store, end to end.

Builds a store with a qcow2 base, a template layered on it and three VM overlays
(all made by qemu-img), mounts scachefs over it, boots nothing but reads the
overlays through the mount with qemu-io (cache=none, as a VM would) and
qemu-img compare, and prints what happened at each step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def sh(*cmd: str | os.PathLike[str], show: bool = True) -> str:
    args = [os.fspath(c) for c in cmd]
    if show:
        print("$ " + " ".join(args), flush=True)
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"demo failed: {' '.join(args)}\n{result.stdout}{result.stderr}")
    return result.stdout


def build_store(store: Path) -> None:
    step(f"building a demo image store in {store}")
    sh("qemu-img", "create", "-q", "-f", "qcow2", store / "base.qcow2", "256M")
    sh("qemu-io", "-c", "write -P 0xb0 0 32M", "-c", "write -P 0xb1 64M 16M",
       store / "base.qcow2", show=False)
    print("base.qcow2: 256 MiB virtual, 48 MiB of data (patterns 0xb0, 0xb1)")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
       store / "template.qcow2")
    sh("qemu-io", "-c", "write -P 0x7e 8M 4M", store / "template.qcow2", show=False)
    (store / "vms").mkdir()
    for n in range(1, 4):
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../template.qcow2", "-F",
           "qcow2", store / "vms" / f"vm{n}.qcow2")


def main() -> int:
    for tool in ("qemu-img", "qemu-io", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"demo: {tool} is missing; run `make demo`, which installs it",
                  file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="scachefs-demo-"))
    store, mnt = work / "store", work / "mnt"
    store.mkdir()
    mnt.mkdir()
    mounted = False
    try:
        build_store(store)
        step("mounting scachefs over the store")
        sh(sys.executable, "-m", "scachefs", store, mnt, "-o", "allow_other,cache_size=256M")
        mounted = True
        print(sh("findmnt", "-n", mnt, show=False).strip())

        step("the image stacks, seen through the mount")
        print(sh("qemu-img", "info", "--backing-chain", mnt / "vms" / "vm1.qcow2").strip())

        step("three VMs read their disks through the mount (qemu-io --cache=none)")
        for n in range(1, 4):
            vm = mnt / "vms" / f"vm{n}.qcow2"
            start = time.monotonic()
            out = sh("qemu-io", "--cache=none", "-c", "read -P 0xb0 0 8M",
                     "-c", "read -P 0x7e 8M 4M", "-c", "read -P 0xb0 12M 20M",
                     "-c", "read -P 0xb1 64M 16M", "-c", f"write -P 0x{n:02x} 100M 1M",
                     "-c", f"read -P 0x{n:02x} 100M 1M", vm, show=False)
            if "Pattern verification failed" in out:
                raise SystemExit(f"demo failed: wrong data read from {vm}\n{out}")
            print(f"vm{n}: read 48 MiB of base + template data, wrote 1 MiB, all patterns "
                  f"verified ({time.monotonic() - start:.2f} s)")

        step("the mount and the store agree (qemu-img compare)")
        for n in range(1, 4):
            print(sh("qemu-img", "compare", mnt / "vms" / f"vm{n}.qcow2",
                     store / "vms" / f"vm{n}.qcow2", show=n == 1).strip())
        sh("qemu-img", "check", "-q", mnt / "vms" / "vm1.qcow2")
        print("qemu-img check: vm1.qcow2 is clean")

        step("what the shared cache did (scachefs-stat)")
        stat_cmd = Path(sys.executable).with_name("scachefs-stat")
        print(sh(stat_cmd if stat_cmd.exists() else "scachefs-stat", mnt).rstrip())
        totals = json.loads(os.getxattr(mnt, "user.scachefs.stats"))["totals"]
        served = totals["hit_bytes"] + totals["miss_bytes"]
        store_bytes = max(1, totals["store_bytes"])
        print(f"\nthe VMs read {served / 2**20:.0f} MiB of backing layers; the store was read "
              f"for {store_bytes / 2**20:.0f} MiB ({served / store_bytes:.1f}x less)")
    finally:
        if mounted:
            step("unmounting")
            sh("fusermount3", "-u", mnt)
        shutil.rmtree(work, ignore_errors=True)
    print("\ndemo finished: every read through scachefs returned the store's bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
