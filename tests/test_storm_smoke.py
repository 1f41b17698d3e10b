"""bench/storm --smoke: the boot-storm harness end to end on a tiny store, so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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


def _storm_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("storm", REPO / "bench" / "storm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["storm"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_smoke_results_never_replace_the_committed_ones(tmp_path: Path) -> None:
    storm = _storm_module()
    results = REPO / "bench" / "results"
    for hosts, name in ((0, "storm.json"), (2, "storm-multihost.json")):
        smoke = storm.json_path(None, True, hosts)
        assert smoke.name == name and not smoke.is_relative_to(REPO), smoke
        assert smoke.parent.is_dir()
        smoke.parent.rmdir()
        assert storm.json_path(None, False, hosts) == results / name  # real runs
        assert storm.json_path(tmp_path / "x.json", True, hosts) == tmp_path / "x.json"


def test_storm_says_it_runs_make_setup_first(tmp_path: Path) -> None:
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "make").write_text('#!/bin/sh\necho "make $*" >> "$0.calls"\nexit 3\n')
    (stub / "make").chmod(0o755)
    result = subprocess.run([REPO / "bench" / "storm", "--smoke"], capture_output=True,
                            text=True, env={**os.environ, "PATH": f"{stub}:{os.environ['PATH']}"},
                            timeout=60, check=False)
    assert result.returncode == 3
    assert "running make setup first" in result.stdout
    assert (stub / "make.calls").read_text() == "make -s setup\n"
