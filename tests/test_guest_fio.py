"""fio inside a real TCG guest, on its own overlay (cache=none), through the mount.

The guest's root file system lives in its overlay; fio writes and reads a file
there with O_DIRECT. With passthrough the kernel does all of that overlay I/O:
the daemon serves only the shared base's reads. bench/guest_fio.py compares
the same guest on the store and through the mount.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.guest import boot, ensure_guest_image, new_overlay, place_base
from tests.mounting import require_tool, run
from tests.test_shadow_cache import layer_stats, stats


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fio_in_a_guest_on_its_overlay_never_reaches_the_daemon(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    require_tool("qemu-system-x86_64")
    image = ensure_guest_image()
    place_base(image, store)
    new_overlay(store, "vm.qcow2")
    mount_factory(store, mnt, "allow_other")
    result = boot(mnt / "vm.qcow2", image, cache="none", job="fio-randrw", timeout=600)
    assert result.reached_multi_user and result.returncode == 0, result.console[-3000:]
    job = json.loads(result.job_output())["jobs"][0]
    assert job["error"] == 0, job
    assert job["read"]["io_bytes"] > 0 and job["write"]["io_bytes"] > 0
    doc = stats(mnt)
    assert doc["fuse"]["passthrough"]
    # Every write of the guest (the fio file, the journal) went to the overlay through
    # the kernel; the daemon served no plain-file I/O at all, only the base's reads.
    assert doc["fuse"]["daemon_io"] == {"reads": 0, "read_bytes": 0, "writes": 0,
                                        "write_bytes": 0}
    assert doc["fuse"]["requests"].get("WRITE", 0) == 0
    base = layer_stats(mnt, "debian.qcow2")
    assert doc["fuse"]["requests"]["READ"] == base["hit_ops"] + base["miss_ops"]
    run("qemu-img", "check", store / "vm.qcow2")
