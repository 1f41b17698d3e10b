"""scachefs-trace: list, show, delete, export/import a trace, and warm a layer of a live mount."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from scachefs import traces as trace_format
from tests.conftest import MountFactory
from tests.mounting import run, settle
from tests.test_boot_traces import (
    boot_script,
    make_boot_base,
    prefetched,
    record_one_boot,
    recorded,
    replay,
    wait_for,
)
from tests.test_shadow_cache import layer_stats, overlay

TOOL = [sys.executable, "-m", "scachefs.tracecli"]


def tool(*args: str | Path, check: bool = True) -> str:
    result = run(*TOOL, *args, check=check)
    return result.stdout + result.stderr


def test_list_show_export_delete_import(store: Path, mnt: Path, tmp_path: Path,
                                        mount_factory: MountFactory) -> None:
    make_boot_base(store)
    first = record_one_boot(store, mnt, mount_factory, "host_id=stage")
    listing = tool("list", store)
    assert "base.qcow2" in listing and "stage" in listing
    rows = json.loads(tool("list", "--json", store))["traces"]
    assert len(rows) == 1 and rows[0]["boots"] == 1 and rows[0]["hosts"] == ["stage"]
    assert rows[0]["merged_bytes"] == first["trace"]["bytes"]
    shown = tool("show", store, "base.qcow2")
    assert "working set:" in shown and "host stage" in shown

    exported = tmp_path / "base.trace"
    tool("export", store, "base.qcow2", exported)
    assert exported.stat().st_size > 0
    tool("delete", store, "base.qcow2")
    assert "(no traces)" in tool("list", store)

    # Ship the image and its trace to another store: a copy is another inode.
    other, other_mnt = tmp_path / "other", tmp_path / "other-mnt"
    other.mkdir()
    other_mnt.mkdir()
    shutil.copyfile(store / "base.qcow2", other / "base.qcow2")
    settle(other / "base.qcow2")  # a fresh copy is not cached until it settles
    tool("import", other, "base.qcow2", exported)
    assert "base.qcow2" in tool("list", other)
    mount_factory(other, other_mnt, "allow_other")
    overlay(other, "vm.qcow2", "base.qcow2")
    replay(other_mnt / "vm.qcow2", boot_script())
    layer = wait_for(other_mnt, "base.qcow2", prefetched)
    assert layer["prefetch"]["stale_chunks"] == 0 and layer["prefetch"]["useful_chunks"] > 0
    assert layer["trace"]["status"] == "ready"
    # An import for a layer of another size is refused.
    (other / "small.qcow2").write_bytes(b"\0" * 4096)
    assert "4096 bytes" in tool("import", other, "small.qcow2", exported, check=False)


def test_warm_shows_progress_and_fills_the_cache(store: Path, mnt: Path,
                                                 mount_factory: MountFactory) -> None:
    make_boot_base(store)
    first = record_one_boot(store, mnt, mount_factory)
    mount_factory(store, mnt, "allow_other", "prefetch=off")
    overlay(store, "vm.qcow2", "base.qcow2")
    run("qemu-img", "info", mnt / "vm.qcow2")  # the scan or an open finds the layer
    out = tool("warm", mnt, "base.qcow2")
    assert "100.0%" in out and "warm in" in out, out
    assert layer_stats(mnt, "base.qcow2")["resident_bytes"] >= first["trace"]["bytes"]
    result = run(*TOOL, "warm", mnt, "vm.qcow2", check=False, timeout=60)
    assert result.returncode != 0 and "not a backing layer" in result.stderr


def test_the_mount_point_works_like_the_store(store: Path, mnt: Path, tmp_path: Path,
                                              mount_factory: MountFactory) -> None:
    make_boot_base(store)
    record_one_boot(store, mnt, mount_factory, "host_id=stage")
    mount_factory(store, mnt, "allow_other")
    # The mount hides .scache: the tool finds the store and the traces through it.
    assert not (mnt / ".scache").exists()
    assert json.loads(tool("list", "--json", mnt)) == json.loads(tool("list", "--json", store))
    assert "host stage" in tool("show", mnt, "base.qcow2")
    exported = tmp_path / "base.trace"
    tool("export", mnt, "base.qcow2", exported)
    tool("delete", mnt, "base.qcow2")
    assert "(no traces)" in tool("list", store)
    tool("import", mnt, "base.qcow2", exported)
    assert "base.qcow2" in tool("list", mnt)
    # A mount that keeps no traces says so.
    other = tmp_path / "other-mnt"
    other.mkdir()
    mount_factory(store, other, "record=off", "prefetch=off")
    result = run(*TOOL, "list", other, check=False)
    assert result.returncode != 0 and "keeps no traces" in result.stderr


def test_a_mount_over_the_store_is_reached_through_the_daemon(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_boot_base(store)
    record_one_boot(store, mnt, mount_factory, "host_id=stage")
    mount_factory(store, store, "allow_other")  # hides the store and its .scache
    assert not (store / ".scache").exists()
    rows = json.loads(tool("list", "--json", store))["traces"]
    assert [(r["layer"], r["hosts"]) for r in rows] == [("base.qcow2", ["stage"])]
    assert "working set:" in tool("show", store, "base.qcow2")


def test_delete_and_import_take_effect_on_a_live_mount(store: Path, mnt: Path, tmp_path: Path,
                                                       mount_factory: MountFactory) -> None:
    make_boot_base(store)
    record_one_boot(store, mnt, mount_factory, "host_id=stage")
    exported = tmp_path / "base.trace"
    tool("export", store, "base.qcow2", exported)
    mount = mount_factory(store, mnt, "allow_other", "host_id=live")
    overlay(store, "vm1.qcow2", "base.qcow2")
    run("qemu-img", "info", "--backing-chain", mnt / "vm1.qcow2")  # attaches the base
    wait_for(mnt, "base.qcow2", lambda la: la["trace"]["status"] == "ready")

    # delete: the live mount forgets the trace at once and records the next boot.
    out = tool("delete", mnt, "base.qcow2")
    assert layer_stats(mnt, "base.qcow2")["trace"]["status"] == "none"
    assert "read the traces again" in out
    replay(mnt / "vm1.qcow2", boot_script())
    layer = wait_for(mnt, "base.qcow2", lambda la: la["trace"]["status"] == "ready"
                     and not la["trace"]["recording"])
    assert layer["trace"]["boots"] == 1 and layer["trace"]["hosts"] == 1
    traces = store / ".scache" / "traces"
    assert [p.name.split(".")[1] for p in traces.glob("*.trace")] == ["live"]

    # import, naming the store (not the mount): the mount that uses it is told too.
    tool("delete", store, "base.qcow2")
    assert layer_stats(mnt, "base.qcow2")["trace"]["status"] == "none"
    tool("import", store, "base.qcow2", exported, "--host", "shipped")
    layer = layer_stats(mnt, "base.qcow2")
    assert layer["trace"]["status"] == "ready" and layer["trace"]["boots"] == 1
    assert layer["prefetch"] is None  # a new prediction: the next boot prefetches it
    os.setxattr(mnt, "user.scachefs.command",
                json.dumps({"action": "drop", "path": "base.qcow2"}).encode())
    replay(mnt / "vm1.qcow2", boot_script())
    layer = wait_for(mnt, "base.qcow2", prefetched)
    assert layer["prefetch"]["reason"] == "first boot"
    assert layer["prefetch"]["useful_chunks"] > 0 and layer["prefetch"]["stale_chunks"] == 0

    # A change nobody announces (another host, an operator's rm) is noticed within seconds.
    for path in traces.glob("*.trace"):
        path.unlink()
    wait_for(mnt, "base.qcow2", lambda la: la["trace"]["status"] == "none", timeout=15)
    assert "changed in the trace directory" in mount.log()


@pytest.mark.parametrize(("recorded_at", "mounted_at"), [("16K", "64K"), ("64K", "16K")])
def test_traces_at_another_chunk_size_are_converted(
        recorded_at: str, mounted_at: str, store: Path, tmp_path: Path,
        mount_factory: MountFactory) -> None:
    base = make_boot_base(store)
    size = {"16K": 16 << 10, "64K": 64 << 10}
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    host_a.mkdir()
    host_b.mkdir()
    record_one_boot(store, host_a, mount_factory, "host_id=a", f"chunk_size={recorded_at}")
    mount = mount_factory(store, host_b, "allow_other", "host_id=b",
                          f"chunk_size={mounted_at}")
    overlay(store, "vm2.qcow2", "base.qcow2")
    run("qemu-img", "info", "--backing-chain", host_b / "vm2.qcow2")  # attaches the base
    layer = wait_for(host_b, "base.qcow2", lambda la: la["trace"]["status"] == "converted")
    trace = layer["trace"]
    assert trace["converted_boots"] == 1 and trace["chunk_sizes"] == [size[recorded_at]]
    assert "converted to this mount's" in mount.log()
    # The tools say so, and predict what the mount prefetches.
    shown = tool("show", host_b, "base.qcow2")
    assert f"chunk size {recorded_at} (converted to {mounted_at})" in shown
    assert f"1 converted from {recorded_at} chunks" in shown
    (row,) = json.loads(tool("list", "--json", host_b))["traces"]
    assert row["recorded_chunk_sizes"] == [size[recorded_at]]
    assert row["chunk_size"] == size[mounted_at] and row["merged_bytes"] == trace["bytes"]
    assert f"{recorded_at} as {mounted_at}" in tool("list", host_b)

    replay(host_b / "vm2.qcow2", boot_script())
    layer = wait_for(host_b, "base.qcow2", lambda la: prefetched(la) and recorded(la))
    pf = layer["prefetch"]
    assert pf["error"] is None and pf["stale_chunks"] == 0 and pf["useful_chunks"] > 0
    assert pf["done_bytes"] == pf["total_bytes"] == trace["bytes"]
    # record=auto recorded one boot at this mount's own chunk size.
    assert layer["trace"]["status"] == "ready" and layer["trace"]["boots"] == 2
    assert layer["trace"]["chunk_sizes"] == sorted(size.values())
    mount.unmount()

    # The converted digests are checked over the bytes they were taken of.
    directory = store / ".scache" / "traces"
    for path in directory.glob("*.b.trace"):
        path.unlink()
    script = boot_script()
    first = next(c for c in script if c.startswith("read"))
    _, _, _, offset, length = first.split()
    run("qemu-io", "-c", f"write -P 0x43 {offset} {length}", base)
    settle(base, 1800)  # changed after the boot was recorded, before this one
    mount_factory(store, host_b, "allow_other", "host_id=b", f"chunk_size={mounted_at}")
    changed = [first.replace("0x42", "0x43")] + [
        c.replace("-P 0x42 ", "") for c in script if c != first]
    replay(host_b / "vm2.qcow2", changed)
    layer = wait_for(host_b, "base.qcow2", prefetched)
    assert layer["prefetch"]["stale_chunks"] > 0


def test_import_keeps_its_host_and_is_idempotent(store: Path, mnt: Path, tmp_path: Path,
                                                 mount_factory: MountFactory) -> None:
    make_boot_base(store)
    record_one_boot(store, mnt, mount_factory, "host_id=stage")
    exported = tmp_path / "base.trace"
    tool("export", store, "base.qcow2", exported)
    # Back into the store it came from: that boot is there already.
    assert "nothing to import" in tool("import", store, "base.qcow2", exported)
    assert json.loads(tool("list", "--json", store))["traces"][0]["boots"] == 1

    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(store / "base.qcow2", other / "base.qcow2")
    assert "as host import-ship" in tool("import", other, "base.qcow2", exported,
                                         "--host", "ship")
    (row,) = json.loads(tool("list", "--json", other))["traces"]
    assert row["hosts"] == ["import-ship"] and row["boots"] == 1
    assert "host import-ship" in tool("show", other, "base.qcow2")
    # The same file again, under the same or another name: still one boot.
    assert "nothing to import" in tool("import", other, "base.qcow2", exported,
                                       "--host", "ship")
    assert "nothing to import" in tool("import", other, "base.qcow2", exported,
                                       "--host", "again")
    (row,) = json.loads(tool("list", "--json", other))["traces"]
    assert row["boots"] == 1 and row["hosts"] == ["import-ship"]
    names = [p.name for p in (other / ".scache" / "traces").iterdir()]
    assert len(names) == 1 and ".import-ship." in names[0]


def test_show_predicts_the_reads_the_prefetch_makes(store: Path, mnt: Path,
                                                    mount_factory: MountFactory) -> None:
    make_boot_base(store)
    record_one_boot(store, mnt, mount_factory)
    shown = tool("show", store, "base.qcow2")
    match = re.search(r"prefetched in (\d+) reads", shown)
    assert match, shown
    mount_factory(store, mnt, "allow_other", "prefetch=mount")
    layer = wait_for(mnt, "base.qcow2", prefetched)
    assert layer["prefetch"]["requests"] == int(match.group(1))


def test_a_host_that_changes_chunk_size_converts_its_own_boots(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_boot_base(store)
    record_one_boot(store, mnt, mount_factory, "host_id=h")
    (path,) = (store / ".scache" / "traces").glob("*.trace")
    before = trace_format.decode(path.read_bytes())
    assert before.chunk_size == 16 << 10
    # The same host, now at 64K, records every boot: its file is rewritten at 64K,
    # its earlier boot converted (same chunks as byte ranges, digests taken afresh).
    mount = mount_factory(store, mnt, "allow_other", "host_id=h", "chunk_size=64K",
                          "record=on")
    overlay(store, "vm2.qcow2", "base.qcow2")
    replay(mnt / "vm2.qcow2", boot_script(seed=8))
    wait_for(mnt, "base.qcow2", lambda la: la["trace"].get("boots") == 2
             and not la["trace"]["recording"])
    mount.unmount()
    (path,) = (store / ".scache" / "traces").glob("*.trace")
    after = trace_format.decode(path.read_bytes())
    assert after.chunk_size == 64 << 10 and len(after.boots) == 2
    old = before.boots[0]
    converted = after.boots[0]
    assert (converted.started, converted.requests) == (old.started, old.requests)
    size = before.layer.size
    assert [(c, ms) for c, ms, _ in converted.chunks] == trace_format.regrid(
        old, 16 << 10, 64 << 10, size)
    # Its digests are the 64K chunks' own: a mount at 64K prefetches it, none stale.
    mount_factory(store, mnt, "allow_other", "host_id=h", "chunk_size=64K")
    replay(mnt / "vm2.qcow2", boot_script())
    layer = wait_for(mnt, "base.qcow2", prefetched)
    assert layer["trace"]["status"] == "ready" and layer["prefetch"]["stale_chunks"] == 0
    assert layer["prefetch"]["useful_chunks"] > 0
