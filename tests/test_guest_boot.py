"""A real Debian guest boots through scachefs: the first boot records, the second is prefetched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.guest import GuestImage, boot, ensure_guest_image, new_overlay, place_base
from tests.mounting import drop_caches, require_tool
from tests.test_boot_traces import wait_for
from tests.test_shadow_cache import layer_stats

RESULTS = Path(os.environ.get("SCACHEFS_GUEST_RESULTS", "/tmp/scachefs-guest-boot.json"))


def boot_through(mnt: Path, store: Path, name: str, image: GuestImage) -> float:
    new_overlay(store, name)
    result = boot(mnt / name, image, cache="none")
    assert result.reached_multi_user, result.console[-3000:]
    assert result.returncode == 0, result.console[-3000:]
    return result.seconds


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_second_boot_is_served_from_prefetched_chunks(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    require_tool("qemu-system-x86_64")
    image = ensure_guest_image()
    place_base(image, store)

    first_mount = mount_factory(store, mnt, "allow_other")
    first_seconds = boot_through(mnt, store, "vm1.qcow2", image)
    first = wait_for(mnt, "debian.qcow2",
                     lambda la: la["trace"]["status"] == "ready"
                     and not la["trace"]["recording"], timeout=60)
    first_mount.unmount()
    traces = list((store / ".scache" / "traces").iterdir())
    assert len(traces) == 1
    trace_bytes = traces[0].stat().st_size

    drop_caches()  # the daemon's cache went with the unmount; now the kernel's
    # record=on: the second boot is recorded too, which tells us what it read.
    mount_factory(store, mnt, "allow_other", "record=on")
    second_seconds = boot_through(mnt, store, "vm2.qcow2", image)
    second = wait_for(mnt, "debian.qcow2",
                      lambda la: la["trace"]["boots"] == 2 and not la["trace"]["recording"]
                      and la["prefetch"] and not la["prefetch"]["running"], timeout=60)
    pf = second["prefetch"]
    boot_chunks = first["trace"]["chunks"]
    results = {
        "trace_file_bytes": trace_bytes,
        "working_set_bytes": first["trace"]["bytes"],
        "working_set_chunks": boot_chunks,
        "first_boot": {"seconds": round(first_seconds, 2), "store_reads": first["store_reads"],
                       "store_bytes": first["store_bytes"],
                       "served_bytes": first["hit_bytes"] + first["miss_bytes"]},
        "second_boot": {"seconds": round(second_seconds, 2),
                        "store_reads": second["store_reads"],
                        "store_bytes": second["store_bytes"],
                        "served_bytes": second["hit_bytes"] + second["miss_bytes"]},
        "prefetch": pf,
        "served_from_prefetch": round(pf["useful_chunks"] / boot_chunks, 4),
    }
    RESULTS.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    # At least 90% of the second boot's base chunks came from prefetched chunks...
    assert pf["useful_chunks"] >= 0.9 * boot_chunks, results
    # ...and the store was read in at most a quarter as many requests.
    assert second["store_reads"] * 4 <= first["store_reads"], results
    assert pf["stale_chunks"] == 0 and pf["error"] is None
    assert layer_stats(mnt, "debian.qcow2")["trace"]["status"] == "ready"
