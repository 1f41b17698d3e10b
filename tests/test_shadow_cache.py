"""The shadow cache through real mounts: layers discovered, shared, read from the store once."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import MountFactory
from tests.mounting import Mount, require_tool, run
from tests.test_qemu_passthrough import make_base, qemu_io

STATS = "user.scachefs.stats"


def stats(mnt: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(os.getxattr(mnt, STATS))
    assert doc["schema"] == 1
    return doc


def layer_stats(mnt: Path, path: str) -> dict[str, Any]:
    found = [layer for layer in stats(mnt)["layers"] if layer["path"] == path]
    assert len(found) == 1, stats(mnt)["layers"]
    return found[0]


def overlay(store: Path, name: str, backing: str, fmt: str = "qcow2") -> Path:
    path = store / name
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, path)
    return path


class PreadTrace:
    """strace of the daemon's pread64 calls: an independent count of store reads."""

    def __init__(self, pid: int, out: Path) -> None:
        require_tool("strace")
        self.out = out
        tids = os.listdir(f"/proc/{pid}/task")
        args = ["strace", "-f", "-qq", "-e", "trace=pread64", "-e", "signal=none",
                "-o", str(out)]
        for tid in tids:
            args += ["-p", tid]
        self.proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let strace attach to every thread

    def stop(self) -> list[tuple[int, int, int]]:
        """(fd, length, returned) of every pread64."""
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=20)
        calls = []
        pattern = re.compile(r"pread64\((\d+), .*, (\d+), (\d+)\)\s+= (\d+)")
        for line in self.out.read_text(errors="replace").splitlines():
            m = pattern.search(line)
            if m:
                calls.append((int(m.group(1)), int(m.group(2)), int(m.group(4))))
        return calls


def fds_of(pid: int, target: Path) -> set[int]:
    fds = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(target):
                fds.add(int(fd))
        except OSError:
            pass
    return fds


def test_eight_vms_read_the_shared_base_from_the_store_once(
        store: Path, mnt: Path, mount_factory: MountFactory, tmp_path: Path) -> None:
    make_base(store)  # data at 0-1M, 8-11M, 40M
    for i in range(8):
        overlay(store, f"vm{i}.qcow2", "base.qcow2")
    mount = mount_factory(store, mnt, "allow_other")
    # Open one VM so the daemon has attached the base and holds its descriptor.
    qemu_io(mnt / "vm0.qcow2", "read -P 0xa1 0 4k", cache="none")
    before = layer_stats(mnt, "base.qcow2")
    trace = PreadTrace(mount.pid, tmp_path / "strace.out")
    procs = [subprocess.Popen(
        ["qemu-io", "--cache=none", "-c", "read -P 0xa1 0 1M", "-c", "read -P 0xb2 8M 3M",
         "-c", "read -P 0xc3 40M 64k", "-c", "read -P 0 20M 1M", str(mnt / f"vm{i}.qcow2")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(8)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and b"verification failed" not in out, out
    layer_fds = fds_of(mount.pid, store / "base.qcow2")
    calls = trace.stop()
    after = layer_stats(mnt, "base.qcow2")

    store_reads = after["store_reads"] - before["store_reads"]
    store_bytes = after["store_bytes"] - before["store_bytes"]
    # Every chunk the VMs needed came from the store exactly once...
    assert after["evictions"] == 0
    assert after["store_bytes"] == after["resident_bytes"]
    assert 4 << 20 <= store_bytes <= (4 << 20) + (2 << 20), store_bytes
    # ...while all eight VMs were served: 8x the bytes the store gave.
    served = (after["hit_bytes"] + after["miss_bytes"]
              - before["hit_bytes"] - before["miss_bytes"])
    assert served >= 8 * (4 << 20), after
    # All but one VM's worth came from memory: cache hits, or waits on a fill another
    # VM started (with eight VMs reading the same offsets at once, most are waits).
    assert served - store_bytes >= 7 * (4 << 20), after
    # Cross-check with strace: the daemon's preads of the base file match its counters.
    base_preads = [c for c in calls if c[0] in layer_fds]
    assert len(base_preads) == store_reads, (base_preads, store_reads)
    assert sum(c[2] for c in base_preads) == store_bytes
    assert max(c[1] for c in base_preads) <= 1 << 20  # coalesced reads of up to 1 MiB


def test_mount_and_store_agree_for_raw_qcow2_and_three_levels(
        store: Path, mnt: Path, mounted: Mount) -> None:
    raw = store / "base.raw"
    raw.write_bytes(os.urandom(6 << 20) + bytes(2 << 20))
    overlay(store, "on-raw.qcow2", "base.raw", fmt="raw")
    make_base(store)
    overlay(store, "tmpl.qcow2", "base.qcow2")
    qemu_io(store / "tmpl.qcow2", "write -P 0x99 8M 1M")
    (store / "vms").mkdir()
    overlay(store, "vms/vm.qcow2", "../tmpl.qcow2")
    qemu_io(store / "vms" / "vm.qcow2", "write -P 0x12 9M 64k")
    for name in ("on-raw.qcow2", "vms/vm.qcow2"):
        for cache in ("none", "writeback"):
            run("qemu-img", "compare", "-T", cache, mnt / name, store / name)
    # Whole layers read through the mount (buffered) equal the store's bytes.
    for name in ("base.raw", "base.qcow2", "tmpl.qcow2"):
        digest = hashlib.sha256((mnt / name).read_bytes()).hexdigest()
        assert digest == hashlib.sha256((store / name).read_bytes()).hexdigest(), name
    layers = {layer["path"]: layer for layer in stats(mnt)["layers"]}
    assert {"base.raw", "base.qcow2", "tmpl.qcow2"} <= set(layers)
    assert "vms/vm.qcow2" not in layers and "on-raw.qcow2" not in layers  # tops pass through
    assert all(layers[n]["attached"] for n in ("base.raw", "base.qcow2", "tmpl.qcow2"))


def test_commit_through_the_mount_is_seen_by_every_reader(store: Path, mnt: Path,
                                                          mounted: Mount) -> None:
    make_base(store)
    overlay(store, "vm1.qcow2", "base.qcow2")
    overlay(store, "vm2.qcow2", "base.qcow2")
    # Fill the cache with the old bytes, through both cache modes.
    qemu_io(mnt / "vm2.qcow2", "read -P 0xa1 0 1M", cache="none")
    qemu_io(mnt / "vm2.qcow2", "read -P 0xa1 0 1M")
    with open(mnt / "base.qcow2", "rb") as keep_open:  # a reader that stays attached
        keep_open.read(4096)
        qemu_io(mnt / "vm1.qcow2", "write -P 0x55 256k 128k")
        run("qemu-img", "commit", "-q", mnt / "vm1.qcow2")
        for cache in ("none", None):
            qemu_io(mnt / "vm2.qcow2", "read -P 0xa1 0 256k", "read -P 0x55 256k 128k",
                    "read -P 0xa1 384k 640k", cache=cache)
    qemu_io(store / "vm2.qcow2", "read -P 0x55 256k 128k")
    run("qemu-img", "check", mnt / "base.qcow2")


def test_changed_on_the_store_gets_a_new_identity(store: Path, mnt: Path,
                                                  mounted: Mount) -> None:
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    qemu_io(mnt / "vm.qcow2", "read -P 0xa1 0 1M", cache="none")
    time.sleep(0.01)
    qemu_io(store / "base.qcow2", "write -P 0x66 0 64k")  # behind the daemon's back
    qemu_io(mnt / "vm.qcow2", "read -P 0x66 0 64k", "read -P 0xa1 64k 960k", cache="none")
    qemu_io(mnt / "vm.qcow2", "read -P 0x66 0 64k")
    assert layer_stats(mnt, "base.qcow2")["identity_changes"] == 1


def test_hard_links_and_renames_reach_the_same_buffer(store: Path, mnt: Path,
                                                      mounted: Mount) -> None:
    make_base(store)
    overlay(store, "vm1.qcow2", "base.qcow2")
    qemu_io(mnt / "vm1.qcow2", "read -P 0xb2 8M 3M", cache="none")
    first = layer_stats(mnt, "base.qcow2")
    os.link(mnt / "base.qcow2", mnt / "alias.qcow2")
    overlay(mnt, "vm2.qcow2", "alias.qcow2")
    qemu_io(mnt / "vm2.qcow2", "read -P 0xb2 8M 3M", cache="none")
    os.rename(mnt / "alias.qcow2", mnt / "renamed.qcow2")
    overlay(mnt, "vm3.qcow2", "renamed.qcow2")
    qemu_io(mnt / "vm3.qcow2", "read -P 0xb2 8M 3M", cache="none")
    doc = stats(mnt)
    assert len([layer for layer in doc["layers"] if layer["attached"]]) == 1
    layer = doc["layers"][0]
    assert layer["identity_changes"] == 0
    assert layer["images"] == 3
    assert layer["store_bytes"] - first["store_bytes"] < 512 << 10  # metadata at most


def test_bad_images_are_logged_and_served_as_plain_files(store: Path, mnt: Path,
                                                         mount_factory: MountFactory) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2",
        store / "a.qcow2", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2",
        store / "b.qcow2", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F",
        "qcow2", store / "orphan.qcow2", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "../../etc/passwd", "-F",
        "raw", store / "escape.qcow2", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw",
        store / "outside.qcow2", "1M")
    broken = bytearray((store / "orphan.qcow2").read_bytes())
    broken[16:20] = (5000).to_bytes(4, "big")  # backing_file_size > 1023
    (store / "broken.qcow2").write_bytes(bytes(broken))
    mount = mount_factory(store, mnt, "allow_other")
    for name in ("a.qcow2", "b.qcow2", "orphan.qcow2", "escape.qcow2", "outside.qcow2",
                 "broken.qcow2"):
        assert (mnt / name).read_bytes() == (store / name).read_bytes()
        assert (mnt / name).read_bytes() == (store / name).read_bytes()  # twice: logged once
    log = mount.log()
    for needle in ("backing loop", "missing.qcow2 does not exist",
                   "../../etc/passwd resolves outside the store",
                   "/etc/passwd is outside the store", "backing_file_size"):
        assert len([line for line in log.splitlines() if needle in line]) == 1, (needle, log)
    doc = stats(mnt)
    assert not [layer for layer in doc["layers"] if layer["attached"]]
    assert doc["shadow"]["problems"] >= 5


def test_direct_io_alignment_probe_and_unaligned_reads(store: Path, mnt: Path,
                                                       mounted: Mount) -> None:
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    qemu_io(mnt / "vm.qcow2", "read -P 0xa1 0 64k", cache="none")  # base is now a layer
    want = (store / "base.qcow2").read_bytes()[:8192]
    fd = os.open(mnt / "base.qcow2", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 8192)
        for size in (512, 4096, 8192):
            view = memoryview(buf)[:size]
            assert os.preadv(fd, [view], 0) == size
            assert bytes(view) == want[:size]
    finally:
        os.close(fd)
    with open(mnt / "base.qcow2", "rb") as f:
        f.seek(3)
        assert f.read(100) == want[3:103]
    layer = layer_stats(mnt, "base.qcow2")
    assert layer["hit_ops"] > 0


def test_stats_and_control_actions(store: Path, mnt: Path, mounted: Mount) -> None:
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    qemu_io(mnt / "vm.qcow2", "read -P 0xa1 0 1M", cache="none")
    assert layer_stats(mnt, "base.qcow2")["resident_bytes"] > 0
    os.setxattr(mnt, "user.scachefs.command", b'{"action": "drop", "path": "base.qcow2"}')
    assert layer_stats(mnt, "base.qcow2")["resident_bytes"] == 0
    # Readable by name, not listed: the root lists only what the store has.
    assert os.listxattr(mnt) == os.listxattr(store)
    assert b'"schema"' in os.getxattr(mnt, "user.scachefs.stats")
    try:
        os.setxattr(mnt, "user.scachefs.command", b"not json")
    except OSError as exc:
        assert exc.errno == 22
    else:
        raise AssertionError("a malformed command was accepted")
    mounted.allow = ("control request",)
