"""bench/storm --smoke: the boot-storm harness end to end on a tiny store, so it cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.mounting import run

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_storm_smoke(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    result = run(sys.executable, REPO / "bench" / "storm.py", "--smoke", "--json", out,
                 timeout=900)
    assert "physical floor" in result.stdout
    doc = json.loads(out.read_text())
    rows = {r["mode"]: r for r in doc["rows"]}
    assert set(rows) == {"direct-none", "direct-pagecache", "direct-pagecache-warm",
                         "scachefs-cold", "scachefs-prefetch", "scachefs-warm"}
    for row in rows.values():
        assert row["n"] == 2 and row["makespan_s"] > 0 and row["vm_max_s"] >= row["vm_p50_s"]
    # Without a shared cache each VM reads the store; the page cache shares the base.
    assert rows["direct-none"]["store_reads"] > rows["direct-pagecache"]["store_reads"]
    # Warmed modes leave (almost) nothing for the storm to read from the store.
    assert rows["scachefs-warm"]["store_bytes"] < rows["scachefs-cold"]["store_bytes"] / 4
    assert rows["scachefs-warm"]["warm_s"] > 0 and rows["direct-pagecache-warm"]["warm_s"] > 0
    assert rows["scachefs-prefetch"]["useful_prefetch"] > 0.5
    for mode in ("scachefs-cold", "scachefs-prefetch", "scachefs-warm"):
        assert 0 < rows[mode]["rss_minus_cached_mib"] < 256
    assert doc["targets"] and doc["working_set_bytes"] > 0
    # The benchmark removes the blkio cgroup it made to throttle the store.
    assert doc["cgroup"].startswith("/sys/fs/cgroup/blkio/scachefs-storm")
    assert not Path(doc["cgroup"]).exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_storm_multihost_smoke(tmp_path: Path) -> None:
    out = tmp_path / "storm-multihost.json"
    result = run(sys.executable, REPO / "bench" / "storm.py", "--smoke", "--hosts", "2",
                 "--vms-per-host", "2", "--json", out, timeout=600)
    assert "second host's first storm" in result.stdout, result.stdout
    doc = json.loads(out.read_text())
    phases = {(r["phase"], r["host"]): r for r in doc["rows"]}
    assert set(phases) == {("direct-sshfs", "h1"), ("first-host-cold", "h1"),
                           ("second-host-no-trace", "h2"), ("second-host-trace", "h2"),
                           ("other-hosts-trace", "h2")}
    direct = phases[("direct-sshfs", "h1")]
    # Without scachefs each VM reads its boot over the wire; with it, the host reads it once.
    assert direct["wire_bytes"] >= 1.8 * doc["unique_working_set_bytes"]
    for key in (("first-host-cold", "h1"), ("second-host-trace", "h2")):
        # (the smoke boot's scattered 4 KiB reads cost scachefs whole windows)
        assert phases[key]["wire_bytes"] < 1.5 * direct["wire_bytes"], phases[key]
    assert phases[("first-host-cold", "h1")]["recorded"]
    assert phases[("second-host-trace", "h2")]["prefetched"]
    assert not phases[("second-host-no-trace", "h2")]["prefetched"]
    assert doc["second_host_first_storm"]["with_trace_s"] > 0
    assert not Path(doc["cgroup"]).exists()
    assert "-storm-" not in run("ip", "netns", "list").stdout  # its namespaces are gone
