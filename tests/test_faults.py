"""Faults of the store under a live scachefs, with real mounts and real clients.

A VM's disk sits on this file system: a wrong byte, a lost write or a dead daemon
is a broken VM. Each test injects one fault into the store (errfs, a FUSE
passthrough that fails chosen byte ranges; a small loop-mounted ext4 that fills
up, is lazily unmounted or shut down) and checks what qemu-io, qemu-img and dd
see through scachefs: the right bytes or a clean errno, never wrong bytes, and a
daemon that keeps serving. docs/reliability.md lists the outcomes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MountFactory
from tests.errfs import ErrStore
from tests.mounting import Mount, mount_type, run
from tests.test_boot_traces import (
    boot_script,
    make_boot_base,
    prefetched,
    record_one_boot,
    replay,
    wait_for,
)
from tests.test_qemu_passthrough import make_base
from tests.test_shadow_cache import layer_stats, overlay, stats

KiB, MiB = 1 << 10, 1 << 20
EIO_TEXT = os.strerror(errno.EIO)  # "Input/output error"
ENOSPC_TEXT = os.strerror(errno.ENOSPC)  # "No space left on device"
ENOTCONN_TEXT = os.strerror(errno.ENOTCONN)  # "Transport endpoint is not connected"
STAT = [sys.executable, "-m", "scachefs.stat"]
EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


# ------------------------------------------------------------------ clients
@dataclasses.dataclass
class IoResult:
    """What one qemu-io run printed: completed requests, failures, pattern mismatches."""

    returncode: int
    output: str

    @property
    def failures(self) -> list[tuple[str, str]]:
        """(operation, error text) of every failed request, in order."""
        return re.findall(r"^(read|write) failed: (.+)$", self.output, re.MULTILINE)

    @property
    def done(self) -> list[tuple[str, int, int]]:
        """(operation, offset, length) of every completed request, in order."""
        return [(op, int(offset), int(n)) for op, n, offset in re.findall(
            r"^(read|wrote) (\d+)/\d+ bytes at offset (\d+)$", self.output, re.MULTILINE)]

    @property
    def wrong_bytes(self) -> bool:
        return "Pattern verification failed" in self.output


def qio(image: Path, *commands: str, cache: str = "none", fmt: str | None = None,
        aio: str | None = None) -> IoResult:
    """qemu-io on an image (direct I/O by default), never raising: the test judges."""
    args: list[str] = ["qemu-io", f"--cache={cache}"]
    if fmt:
        args += ["-f", fmt]
    if aio:
        args += [f"--aio={aio}"]
    for command in commands:
        args += ["-c", command]
    result = run(*args, image, check=False, timeout=60)
    return IoResult(result.returncode, result.stdout + result.stderr)


def host_offset(image: Path, guest: int) -> int:
    """Where a guest offset of a qcow2 image lives in the image file (qemu-img map)."""
    extents = json.loads(run("qemu-img", "map", "--output=json", image).stdout)
    for extent in extents:
        if extent["data"] and extent["start"] <= guest < extent["start"] + extent["length"]:
            return int(extent["offset"]) + guest - int(extent["start"])
    raise AssertionError(f"guest offset {guest} has no data in {image}: {extents}")


def image_check(image: Path) -> dict[str, Any]:
    """qemu-img check as JSON (exit 0: clean, 3: leaked clusters only)."""
    result = run("qemu-img", "check", "--output=json", image, check=False, timeout=60)
    assert result.returncode in (0, 3), (result.returncode, result.stdout, result.stderr)
    doc: dict[str, Any] = json.loads(result.stdout)
    assert doc.get("corruptions", 0) == 0 and doc.get("check-errors", 0) == 0, doc
    return doc


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log_lines(mount: Mount, *needles: str) -> list[str]:
    return [line for line in mount.log().splitlines() if all(n in line for n in needles)]


def daemon_requests(mnt: Path, opcode: str) -> int:
    """How many requests of an opcode (READ, WRITE, ...) reached the daemon."""
    return int(stats(mnt)["fuse"]["requests"].get(opcode, 0))


# The two data paths of a file that is not a shared layer: the kernel's (FUSE
# passthrough, the default where the kernel has it) and the daemon's (passthrough=off).
PATHS = pytest.mark.parametrize("path", ["passthrough=auto", "passthrough=off"],
                                ids=["kernel", "daemon"])


def alive(mount: Mount) -> None:
    """Assert the daemon runs and its mount answers; if not, let a dying daemon finish
    exiting first (so the fixture's teardown does not race it)."""
    if mount.proc.poll() is None and (
            mount_type(mount.mountpoint) == (str(mount.source), "fuse.scachefs")):
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        mount.proc.wait(timeout=10)
    raise AssertionError(f"scachefs is gone (exit {mount.proc.returncode}, mount "
                         f"{mount_type(mount.mountpoint)}):\n{mount.log()[-3000:]}")


# ----------------------------------------------------------------- fixtures
@pytest.fixture
def errstore(store: Path, tmp_path: Path) -> Iterator[ErrStore]:
    """errfs serving `store` at tmp_path/errfs: list it before mount_factory, so that
    scachefs mounts on it are torn down first."""
    failing = ErrStore(store, tmp_path / "errfs", tmp_path / "errfs.log")
    yield failing
    failing.stop()


@pytest.fixture
def crashable(mount_factory: MountFactory) -> Iterator[MountFactory]:
    """mount_factory for daemons that a bug may kill: at teardown it first waits for a
    dying daemon to exit, so that mount_factory's own unmount does not race it."""
    made: list[Mount] = []

    def factory(*args: Any, **kwargs: Any) -> Mount:
        mount = mount_factory(*args, **kwargs)
        made.append(mount)
        return mount

    yield factory
    for mount in made:
        if mount.proc.poll() is None and (
                mount_type(mount.mountpoint) != (str(mount.source), "fuse.scachefs")):
            with contextlib.suppress(subprocess.TimeoutExpired):
                mount.proc.wait(timeout=10)


class LoopFs:
    """A small ext4 file system on a loop device, mounted at a directory."""

    def __init__(self, image: Path, mountpoint: Path, size_mib: int) -> None:
        self.image, self.mountpoint = image, mountpoint
        run("truncate", "-s", f"{size_mib}M", image)
        # -m 0: no blocks reserved for root (the daemon runs as root and would use them).
        run("mkfs.ext4", "-q", "-m", "0", image)
        self.device = run("losetup", "-f", "--show", image).stdout.strip()
        self.mount()
        mountpoint.chmod(0o755)

    def mount(self) -> None:
        run("mount", self.device, self.mountpoint)

    def mounted(self) -> bool:
        return mount_type(self.mountpoint) == (self.device, "ext4")

    def shutdown(self) -> None:
        """EXT4_IOC_SHUTDOWN: the disk dies; every later I/O of the file system fails EIO."""
        fd = os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)

    def cleanup(self) -> None:
        if self.mounted() and run("umount", self.mountpoint, check=False).returncode != 0:
            run("umount", "-l", self.mountpoint, check=False)
        run("losetup", "-d", self.device, check=False)


@pytest.fixture
def loopfs(store: Path, tmp_path: Path) -> Iterator[Callable[[int], LoopFs]]:
    """Mount a fresh ext4 of SIZE MiB over `store`; list it before mount_factory."""
    made: list[LoopFs] = []

    def make(size_mib: int) -> LoopFs:
        fs = LoopFs(tmp_path / f"store-{len(made)}.ext4", store, size_mib)
        made.append(fs)
        return fs

    yield make
    for fs in reversed(made):
        fs.cleanup()


# ------------------------------------------------------ EIO from the store
def test_a_read_error_fails_only_its_range_and_caches_nothing(
        store: Path, errstore: ErrStore, mnt: Path, mount_factory: MountFactory) -> None:
    make_base(store)  # 0xa1 at 0-1M, 0xb2 at 8-11M, 0xc3 at 40M
    make_base(store, "other.qcow2")
    overlay(store, "vm.qcow2", "base.qcow2")
    overlay(store, "vm-other.qcow2", "other.qcow2")
    mount = mount_factory(errstore.mountpoint, mnt, "allow_other")
    bad = host_offset(store / "base.qcow2", 9 * MiB)  # one 64 KiB cluster of the base
    errstore.arm({"path": "base.qcow2", "offset": bad, "length": 64 * KiB})

    vm = qio(mnt / "vm.qcow2", "read -P 0xa1 0 1M", "read -P 0xb2 9M 64k",
             "read -P 0xb2 8M 1M", "read -P 0xc3 40M 64k", "read -P 0xb2 9M 64k",
             "read -P 0xb2 10M 1M")
    assert vm.returncode != 0 and not vm.wrong_bytes, vm.output
    assert vm.failures == [("read", EIO_TEXT)] * 2, vm.output
    assert vm.done == [("read", 0, MiB), ("read", 8 * MiB, MiB), ("read", 40 * MiB, 64 * KiB),
                       ("read", 10 * MiB, MiB)], vm.output
    # Another stack, in the same run of the daemon, is untouched.
    other = qio(mnt / "vm-other.qcow2", "read -P 0xa1 0 1M", "read -P 0xb2 8M 3M")
    assert other.returncode == 0 and not other.failures and not other.wrong_bytes, other.output

    alive(mount)
    injected = errstore.injected()
    assert [(f["path"], f["offset"]) for f in injected] == [("base.qcow2", bad)] * 2
    assert layer_stats(mnt, "base.qcow2")["fill_errors"] == 2  # a failure is not cached...
    assert stats(mnt)["totals"]["fill_errors"] == 2
    # ...and the store's error was logged with the layer and range, once per failure.
    assert len(log_lines(mount, f"store read of layer base.qcow2 at {bad}+",
                         f"failed: {EIO_TEXT}")) == 2

    errstore.disarm()  # the store heals: the same read now gets the right bytes
    again = qio(mnt / "vm.qcow2", "read -P 0xb2 9M 64k", "read -P 0xb2 8M 3M")
    assert again.returncode == 0 and not again.failures and not again.wrong_bytes, again.output
    assert sha256(mnt / "base.qcow2") == sha256(store / "base.qcow2")
    table = run(*STAT, mnt).stdout
    assert re.search(r"^base\.qcow2\s", table, re.MULTILINE), table
    assert ", 2 errors," in table, table


def test_each_store_failure_is_logged_once(store: Path, errstore: ErrStore, mnt: Path,
                                           mount_factory: MountFactory) -> None:
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    mount = mount_factory(errstore.mountpoint, mnt, "allow_other")
    errstore.arm({"path": "base.qcow2", "offset": host_offset(store / "base.qcow2", 9 * MiB),
                  "length": 64 * KiB})
    vm = qio(mnt / "vm.qcow2", "read -P 0xb2 9M 64k")
    assert vm.failures == [("read", EIO_TEXT)], vm.output
    injected = errstore.injected()
    assert len(injected) == 1
    failed = log_lines(mount, "WARNING", "failed")
    assert len(failed) == len(injected), failed


@PATHS
def test_a_read_error_in_a_plain_image_reaches_the_reader(
        store: Path, errstore: ErrStore, mnt: Path, mount_factory: MountFactory,
        path: str) -> None:
    disk = store / "disk.raw"  # a VM's raw disk: not a backing layer, plain passthrough
    run("qemu-img", "create", "-q", "-f", "raw", disk, "4M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", disk)
    mount = mount_factory(errstore.mountpoint, mnt, "allow_other", path)
    errstore.arm({"path": "disk.raw", "offset": MiB, "length": 64 * KiB})

    vm = qio(mnt / "disk.raw", "read -P 0x5a 0 64k", "read -P 0x5a 1M 64k",
             "read -P 0x5a 2M 1M", fmt="raw")
    assert vm.failures == [("read", EIO_TEXT)] and not vm.wrong_bytes, vm.output
    assert vm.done == [("read", 0, 64 * KiB), ("read", 2 * MiB, MiB)], vm.output
    dd = run("dd", f"if={mnt / 'disk.raw'}", "of=/dev/null", "bs=64k", "skip=16", "count=1",
             check=False)
    assert dd.returncode != 0 and EIO_TEXT in dd.stderr, dd.stderr

    alive(mount)
    assert "disk.raw" not in [layer["path"] for layer in stats(mnt)["layers"]]
    injected = errstore.injected()
    assert injected and all(f["path"] == "disk.raw" for f in injected)
    assert len(injected) >= 2
    if path == "passthrough=off":
        # Store errors are logged at most once per operation and errno every 10 s (a
        # failing disk must not flood the journal): this burst is one line.
        assert len(log_lines(mount, "read failed in the store", EIO_TEXT)) == 1
    else:  # the kernel read the store itself: the daemon saw none of it
        assert daemon_requests(mnt, "READ") == 0
    errstore.disarm()
    healed = qio(mnt / "disk.raw", "read -P 0x5a 0 4M", fmt="raw")
    assert healed.returncode == 0 and not healed.wrong_bytes, healed.output


QEMU_CLIENTS = {"qemu-aio-native": {"aio": "native"}, "qemu-buffered": {"cache": "writeback"}}


def mount_disk_with_a_bad_sector(store: Path, errstore: ErrStore, mnt: Path,
                                 mount_factory: MountFactory, passthrough: str) -> None:
    """disk.raw, 4 MiB of 0x5a, mounted, with a bad 4 KiB in the middle of the 64 KiB
    request at 1 MiB: the store's pread returns the 32 KiB before it (as a disk's does);
    only a read starting inside it fails."""
    disk = store / "disk.raw"
    run("qemu-img", "create", "-q", "-f", "raw", disk, "4M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", disk)
    mount_factory(errstore.mountpoint, mnt, "allow_other", f"passthrough={passthrough}")
    errstore.arm({"path": "disk.raw", "offset": MiB + 32 * KiB, "length": 4 * KiB,
                  "partial": True})


def read_across_the_bad_sector(image: Path, client: str,
                               dd_out: Path) -> subprocess.CompletedProcess[str] | IoResult:
    """The 64 KiB at 1 MiB (short, then EIO) and the 64 KiB at 2 MiB, as `client` reads."""
    if client == "dd":
        return run("dd", f"if={image}", f"of={dd_out}", "bs=64k", "skip=16", "count=2",
                   check=False)
    return qio(image, "read -P 0x5a 1M 64k", "read -P 0x5a 2M 64k", fmt="raw",
               **QEMU_CLIENTS[client])


@pytest.mark.parametrize("client", [*QEMU_CLIENTS, "dd"])
def test_a_short_read_from_the_store_is_never_served_as_wrong_bytes(
        store: Path, errstore: ErrStore, mnt: Path, mount_factory: MountFactory,
        tmp_path: Path, client: str) -> None:
    """The daemon's own path never passes a store's short read on (passthrough=off)."""
    mount_disk_with_a_bad_sector(store, errstore, mnt, mount_factory, "off")
    out = tmp_path / "dd.out"
    vm = read_across_the_bad_sector(mnt / "disk.raw", client, out)
    if isinstance(vm, subprocess.CompletedProcess):
        # A partial first block is what dd gets from a disk with a bad sector too; the
        # next read, at the bad range, must fail, not meet a premature end of file.
        got = out.read_bytes()
        assert got == b"\x5a" * len(got)
        assert vm.returncode != 0 and EIO_TEXT in vm.stderr, vm.stderr
        assert os.stat(mnt / "disk.raw").st_size == 4 * MiB
        return
    assert not vm.wrong_bytes, vm.output
    assert vm.failures == [("read", EIO_TEXT)], vm.output
    assert vm.done == [("read", 2 * MiB, 64 * KiB)], vm.output


@pytest.mark.parametrize("client", [*QEMU_CLIENTS, "dd"])
def test_a_passed_through_file_fails_exactly_as_the_store_does(
        store: Path, errstore: ErrStore, mnt: Path, mount_factory: MountFactory,
        tmp_path: Path, client: str) -> None:
    """With passthrough the kernel reads the store itself: whatever a client gets from a
    store with a bad sector (a short read, then EIO), it gets the same through the mount."""
    mount_disk_with_a_bad_sector(store, errstore, mnt, mount_factory, "on")

    def outcome(image: Path) -> tuple[object, ...]:
        out = tmp_path / "dd.out"
        vm = read_across_the_bad_sector(image, client, out)
        if isinstance(vm, subprocess.CompletedProcess):
            return vm.returncode, out.read_bytes(), EIO_TEXT in vm.stderr
        return vm.returncode, vm.wrong_bytes, tuple(vm.failures), tuple(vm.done)

    direct = outcome(errstore.mountpoint / "disk.raw")
    through = outcome(mnt / "disk.raw")
    assert through == direct
    assert daemon_requests(mnt, "READ") == 0


def test_a_short_read_of_a_layer_is_an_error_not_wrong_bytes(
        store: Path, errstore: ErrStore, mnt: Path, mount_factory: MountFactory) -> None:
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    mount = mount_factory(errstore.mountpoint, mnt, "allow_other")
    bad = host_offset(store / "base.qcow2", 9 * MiB) + 32 * KiB
    errstore.arm({"path": "base.qcow2", "offset": bad, "length": 4 * KiB, "partial": True})
    for aio in ("native", "threads"):
        vm = qio(mnt / "vm.qcow2", "read -P 0xb2 9M 64k", "read -P 0xb2 10M 64k", aio=aio)
        assert not vm.wrong_bytes, vm.output
        assert vm.failures == [("read", EIO_TEXT)], vm.output
        assert vm.done == [("read", 10 * MiB, 64 * KiB)], vm.output
    assert any(f["partial"] for f in errstore.injected())
    assert layer_stats(mnt, "base.qcow2")["fill_errors"] == 2
    alive(mount)


@PATHS
def test_write_and_fsync_errors_on_an_overlay_are_reported(
        store: Path, errstore: ErrStore, mnt: Path, mount_factory: MountFactory,
        path: str) -> None:
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    mount = mount_factory(errstore.mountpoint, mnt, "allow_other", path)
    first = qio(mnt / "vm.qcow2", "write -P 0x11 0 64k", "flush")
    assert first.returncode == 0 and first.done == [("wrote", 0, 64 * KiB)], first.output

    errstore.arm({"path": "vm.qcow2", "op": "write", "offset": 0, "length": 1 << 40})
    failed = qio(mnt / "vm.qcow2", "write -P 0x22 1M 64k", "flush")
    assert failed.returncode != 0 and failed.failures == [("write", EIO_TEXT)], failed.output
    # fsync: a write into an allocated cluster succeeds, the flush after it must not.
    errstore.arm({"path": "vm.qcow2", "op": "fsync", "offset": 0, "length": 1})
    unsynced = qio(mnt / "vm.qcow2", "write -P 0x33 0 64k", "flush")
    assert unsynced.done == [("wrote", 0, 64 * KiB)], unsynced.output
    assert unsynced.returncode != 0, unsynced.output  # qemu-io's flush fails silently but exits 1
    assert [f["op"] for f in errstore.injected()].count("fsync") >= 1
    assert log_lines(mount, "fsync failed in the store", EIO_TEXT)  # fsync: always ours
    if path == "passthrough=off":
        assert log_lines(mount, "write failed in the store", EIO_TEXT)
    else:
        assert daemon_requests(mnt, "WRITE") == 0

    errstore.disarm()
    alive(mount)
    image_check(mnt / "vm.qcow2")
    after = qio(mnt / "vm.qcow2", "read -P 0x33 0 64k", "read -P 0xa1 64k 960k",
                "read -P 0xb2 8M 3M")
    assert after.returncode == 0 and not after.wrong_bytes, after.output


# ----------------------------------------------- store errors off the read path
@pytest.mark.parametrize("when", ["mount", "first-boot"])
def test_a_store_error_during_prefetch_does_not_kill_the_daemon(
        store: Path, errstore: ErrStore, mnt: Path, crashable: MountFactory,
        when: str) -> None:
    make_boot_base(store)
    recorded = record_one_boot(store, mnt, crashable)["trace"]  # on the healthy store
    data_start = host_offset(store / "base.qcow2", 0)
    # The first 4 MiB of data: where the boot reads, not where the layer's fingerprint
    # samples (its head, L1 table and blocks at eighths of the file: see traces.py).
    errstore.arm({"path": "base.qcow2", "offset": data_start, "length": 4 << 20})
    options = ("prefetch=mount",) if when == "mount" else ()
    # Tracebacks are judged below, in the test, not by the fixture's log check.
    mount = crashable(errstore.mountpoint, mnt, "allow_other", *options,
                          allow=("Traceback",))
    overlay(store, "vm2.qcow2", "base.qcow2")
    if when == "first-boot":
        vm = qio(mnt / "vm2.qcow2", "read -P 0x42 0 64k")
        assert vm.failures == [("read", EIO_TEXT)], vm.output
    deadline = time.monotonic() + 15
    while True:
        alive(mount)
        layer = layer_stats(mnt, "base.qcow2")
        if prefetched(layer):
            break
        assert time.monotonic() < deadline, layer
        time.sleep(0.1)
    assert layer["prefetch"]["error"] == EIO_TEXT, layer["prefetch"]
    assert log_lines(mount, "prefetch of base.qcow2 failed")
    errstore.disarm()
    replay(mnt / "vm2.qcow2", boot_script(think_ms=0))  # the VMs boot from the healed store
    alive(mount)
    assert layer_stats(mnt, "base.qcow2")["trace"]["boots"] == recorded["boots"]
    assert "Traceback" not in mount.log()


def test_a_layer_that_cannot_be_fingerprinted_gets_its_traces_at_a_later_open(
        store: Path, errstore: ErrStore, mnt: Path, crashable: MountFactory) -> None:
    make_boot_base(store)
    record_one_boot(store, mnt, crashable)
    errstore.arm({"path": "base.qcow2", "offset": 0, "length": 1 << 30})
    mount = crashable(errstore.mountpoint, mnt, "allow_other")
    overlay(store, "vm2.qcow2", "base.qcow2")
    vm = qio(mnt / "vm2.qcow2", "read -P 0x42 0 64k")  # the store fails every read
    assert "Input/output error" in vm.output, vm.output
    layer = layer_stats(mnt, "base.qcow2")
    assert layer["trace"]["status"] == "error" and layer["prefetch"] is None, layer
    assert log_lines(mount, "cannot read it to fingerprint it")
    errstore.disarm()
    replay(mnt / "vm2.qcow2", boot_script(think_ms=0))  # the store is back: tried again
    layer = wait_for(mnt, "base.qcow2", prefetched)
    assert layer["trace"]["status"] == "ready" and layer["prefetch"]["error"] is None
    assert layer["prefetch"]["useful_chunks"] > 0
    alive(mount)


@pytest.mark.parametrize("prefetch", ["open", "mount"])
def test_an_unreadable_trace_file_is_logged_and_ignored(
        store: Path, errstore: ErrStore, mnt: Path, crashable: MountFactory,
        prefetch: str) -> None:
    make_boot_base(store)
    record_one_boot(store, mnt, crashable)
    trace = next((store / ".scache" / "traces").iterdir())
    errstore.arm({"path": f".scache/traces/{trace.name}", "offset": 0, "length": 1 << 30})
    mount = crashable(errstore.mountpoint, mnt, "allow_other", f"prefetch={prefetch}",
                          allow=("Traceback",))  # judged below, in the test
    deadline = time.monotonic() + 10
    while True:  # until the mount-time scan found the layer
        alive(mount)
        if stats(mnt)["shadow"]["layers"] >= 1:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # prefetch=mount: give the mount-time prefetch its try
    alive(mount)
    dd = run("dd", f"if={mnt / 'base.qcow2'}", "of=/dev/null", "bs=64k", "count=16",
             check=False)
    assert dd.returncode == 0, dd.stderr
    assert errstore.injected(), "the trace file was never read"
    assert log_lines(mount, trace.name), "the unreadable trace file was not named in the log"
    replay(mnt / "vm1.qcow2", boot_script(think_ms=0))
    alive(mount)
    assert "Traceback" not in mount.log()


def test_open_with_o_nofollow(store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    (store / "disk.raw").write_bytes(b"\x5a" * 65536)
    mount_factory(store, mnt, "allow_other")
    dd = run("dd", f"if={mnt / 'disk.raw'}", "iflag=nofollow", "of=/dev/null", "bs=64k",
             check=False)
    assert dd.returncode == 0, dd.stderr


# ------------------------------------------------------------- a full store
@PATHS
def test_enospc_fails_the_write_and_the_mount_keeps_serving(
        store: Path, loopfs: Callable[[int], LoopFs], mnt: Path,
        mount_factory: MountFactory, path: str) -> None:
    loopfs(24)
    make_base(store)  # ~4.5 MiB
    overlay(store, "vm.qcow2", "base.qcow2")
    overlay(store, "vm2.qcow2", "base.qcow2")
    (store / "filler").write_bytes(os.urandom(6 * MiB))
    mount = mount_factory(store, mnt, "allow_other", path)
    kept = qio(mnt / "vm.qcow2", "write -P 0x11 60M 64k", "flush")
    assert kept.returncode == 0, kept.output
    free = os.statvfs(store).f_bavail * os.statvfs(store).f_frsize
    assert free < 32 * MiB

    full = qio(mnt / "vm.qcow2", "write -P 0x5a 0 32M", "flush")
    assert full.returncode != 0 and full.failures == [("write", ENOSPC_TEXT)], full.output
    if path == "passthrough=off":
        assert log_lines(mount, "write failed in the store", ENOSPC_TEXT)
    else:
        assert daemon_requests(mnt, "WRITE") == 0
    alive(mount)
    # The daemon serves on: other VMs, the VM's own flushed data, the base.
    other = qio(mnt / "vm2.qcow2", "read -P 0xa1 0 1M", "read -P 0xb2 8M 3M")
    assert other.returncode == 0 and not other.wrong_bytes, other.output
    same = qio(mnt / "vm.qcow2", "read -P 0x11 60M 64k", "read -P 0xc3 40M 64k")
    assert same.returncode == 0 and not same.wrong_bytes, same.output
    image_check(mnt / "vm.qcow2")

    os.unlink(mnt / "filler")  # the operator frees space: writes work again
    again = qio(mnt / "vm.qcow2", "write -P 0x5b 0 4M", "flush", "read -P 0x5b 0 4M",
                "read -P 0x11 60M 64k")
    assert again.returncode == 0 and not again.wrong_bytes, again.output
    image_check(mnt / "vm.qcow2")
    check_store = qio(store / "vm.qcow2", "read -P 0x5b 0 4M", "read -P 0x11 60M 64k")
    assert check_store.returncode == 0 and not check_store.wrong_bytes, check_store.output


def _fill(directory: Path) -> None:
    """Use up every block and inode of a file system."""
    for name, bs in (("filler", "1M"), ("filler-small", "1k")):
        dd = run("dd", "if=/dev/zero", f"of={directory / name}", f"bs={bs}", check=False)
        assert ENOSPC_TEXT in dd.stderr, dd.stderr
    with pytest.raises(OSError) as exc:
        for i in range(100000):
            (directory / f"f{i}").write_bytes(b"x")
    assert exc.value.errno == errno.ENOSPC


def test_a_failed_trace_save_is_logged_and_the_next_boot_recorded(
        store: Path, loopfs: Callable[[int], LoopFs], mnt: Path,
        mount_factory: MountFactory) -> None:
    loopfs(96)
    make_boot_base(store)
    overlay(store, "vm1.qcow2", "base.qcow2")
    overlay(store, "vm2.qcow2", "base.qcow2")
    mount = mount_factory(store, mnt, "allow_other")
    _fill(store)
    replay(mnt / "vm1.qcow2", boot_script(think_ms=0))
    deadline = time.monotonic() + 10
    while not log_lines(mount, "could not save the boot trace of base.qcow2", ENOSPC_TEXT):
        assert time.monotonic() < deadline, mount.log()
        time.sleep(0.1)
    traces = store / ".scache" / "traces"
    assert os.listdir(traces) == []  # no temporary file left behind
    alive(mount)
    for name in os.listdir(store):
        if name.startswith("f"):
            os.unlink(store / name)
    replay(mnt / "vm2.qcow2", boot_script(think_ms=0))
    layer = wait_for(mnt, "base.qcow2",
                     lambda la: la["trace"]["status"] == "ready", timeout=10)
    assert layer["trace"]["boots"] == 1
    assert len(os.listdir(traces)) == 1


# ------------------------------------------------------- the store goes away
def test_a_lazily_unmounted_store_keeps_serving_the_detached_tree(
        store: Path, loopfs: Callable[[int], LoopFs], mnt: Path,
        mount_factory: MountFactory) -> None:
    fs = loopfs(64)
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    overlay(store, "vm2.qcow2", "base.qcow2")
    mount = mount_factory(store, mnt, "allow_other")
    warm = qio(mnt / "vm.qcow2", "read -P 0xa1 0 1M")
    assert warm.returncode == 0, warm.output

    run("umount", "-l", store)
    assert not fs.mounted() and os.listdir(store) == []  # gone from the namespace...
    # ...but scachefs holds descriptors of the store's root and files: it keeps serving
    # the detached file system, reads and writes alike, with the right bytes.
    alive(mount)
    assert sorted(os.listdir(mnt)) == ["base.qcow2", "lost+found", "vm.qcow2", "vm2.qcow2"]
    vm = qio(mnt / "vm.qcow2", "read -P 0xa1 0 1M", "read -P 0xb2 8M 3M",
             "write -P 0x33 20M 64k", "flush", "read -P 0x33 20M 64k")
    assert vm.returncode == 0 and not vm.wrong_bytes, vm.output
    vm2 = qio(mnt / "vm2.qcow2", "read -P 0xc3 40M 64k")
    assert vm2.returncode == 0 and not vm2.wrong_bytes, vm2.output
    image_check(mnt / "vm.qcow2")
    assert stats(mnt)["totals"]["fill_errors"] == 0
    # A new store mounted at the same path is not what scachefs serves.
    run("mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", store)
    try:
        (store / "new-store.qcow2").write_bytes(b"new")
        assert "new-store.qcow2" not in os.listdir(mnt)
        assert "vm.qcow2" in os.listdir(mnt)
    finally:
        run("umount", store)
    mount.unmount()  # the last reference: the detached ext4 is released cleanly
    fs.mount()  # the write made after the lazy unmount is in the file system
    on_disk = qio(store / "vm.qcow2", "read -P 0x33 20M 64k", "read -P 0xa1 0 1M")
    assert on_disk.returncode == 0 and not on_disk.wrong_bytes, on_disk.output


def slow_reader(image: Path, *commands: str) -> subprocess.Popen[str]:
    args = ["qemu-io", "--cache=none"]
    for command in commands:
        args += ["-c", command]
    return subprocess.Popen([*args, str(image)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _resident(mnt: Path, path: str) -> int:
    return sum(int(layer.get("resident_bytes", 0)) for layer in stats(mnt)["layers"]
               if layer["path"] == path)


def wait_resident(mnt: Path, path: str, nbytes: int, reader: subprocess.Popen[str]) -> None:
    """Wait until a reader (still running) has brought nbytes of a layer into the cache."""
    deadline = time.monotonic() + 15
    while _resident(mnt, path) < nbytes:
        assert reader.poll() is None and time.monotonic() < deadline, reader.stdout
        time.sleep(0.05)


def test_the_store_disk_dies_under_a_live_mount(
        store: Path, loopfs: Callable[[int], LoopFs], mnt: Path,
        mount_factory: MountFactory) -> None:
    fs = loopfs(64)
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    os.sync()
    mount = mount_factory(store, mnt, "allow_other")
    # A VM reads part of its base, then keeps running while the store's disk dies.
    vm = slow_reader(mnt / "vm.qcow2", "read -P 0xa1 0 1M", "sleep 2500",
                      "read -P 0xa1 0 1M", "read -P 0xb2 8M 64k", "write -P 0x44 30M 64k")
    wait_resident(mnt, "base.qcow2", MiB, vm)
    fs.shutdown()
    out, _ = vm.communicate(timeout=30)
    result = IoResult(vm.returncode, out)
    assert not result.wrong_bytes, out
    # Cached base chunks are still served; everything that needs the store gets EIO.
    assert result.done == [("read", 0, MiB), ("read", 0, MiB)], out
    assert result.failures == [("read", EIO_TEXT), ("write", EIO_TEXT)], out
    alive(mount)
    doc = stats(mnt)
    assert doc["totals"]["fill_errors"] >= 1
    assert log_lines(mount, "store read of layer base.qcow2", EIO_TEXT)
    opened = qio(mnt / "vm.qcow2", "read -P 0xa1 0 64k")
    assert opened.returncode != 0 and EIO_TEXT in opened.output, opened.output


def test_the_store_daemon_dies_under_a_live_mount(
        store: Path, errstore: ErrStore, mnt: Path, mount_factory: MountFactory) -> None:
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    mount = mount_factory(errstore.mountpoint, mnt, "allow_other")
    vm = slow_reader(mnt / "vm.qcow2", "read -P 0xa1 0 1M", "sleep 2500",
                      "read -P 0xa1 0 1M", "read -P 0xb2 8M 64k")
    wait_resident(mnt, "base.qcow2", MiB, vm)
    errstore.kill()  # the store (a FUSE file system here) now answers ENOTCONN
    out, _ = vm.communicate(timeout=30)
    result = IoResult(vm.returncode, out)
    assert not result.wrong_bytes, out
    assert result.done == [("read", 0, MiB), ("read", 0, MiB)], out
    # The store's errno reaches the VM as is: ENOTCONN, although scachefs is alive.
    assert result.failures == [("read", ENOTCONN_TEXT)], out
    alive(mount)
    table = run(*STAT, mnt).stdout  # scachefs-stat still answers: the daemon is fine
    assert re.search(r"^base\.qcow2\s", table, re.MULTILINE), table
    with pytest.raises(OSError) as exc:
        os.listdir(mnt)
    assert exc.value.errno == errno.ENOTCONN
    assert log_lines(mount, "failed in the store", ENOTCONN_TEXT)
