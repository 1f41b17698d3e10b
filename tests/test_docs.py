"""What the operator docs state about behaviour, checked (docs/*.md, the man pages)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from scachefs import traces
from tests.conftest import MountFactory
from tests.mounting import USER, run
from tests.test_boot_traces import (
    boot_script,
    make_boot_base,
    record_one_boot,
    recorded,
    replay,
    wait_for,
)
from tests.test_permissions import public_dir  # noqa: F401 (fixture)
from tests.test_qemu_passthrough import make_base, qemu_io
from tests.test_shadow_cache import layer_stats, overlay, stats

REPO = Path(__file__).resolve().parent.parent
STAT = [sys.executable, "-m", "scachefs.stat"]


def test_mount_over_a_subtree_of_bases_needs_layers_all(
        store: Path, mount_factory: MountFactory) -> None:
    """mount-over-source.md: a sub-tree of bases is cached with layers=all, not without."""
    bases = store / "bases"
    bases.mkdir()
    make_base(bases)
    # The overlay lives outside the mount and names its base by absolute path.
    overlay(store, "vm.qcow2", str(bases / "base.qcow2"))
    for option, cached in (("layers=auto", False), ("layers=all", True)):
        mount = mount_factory(bases, bases, "allow_other", option)
        qemu_io(store / "vm.qcow2", "read -P 0xb2 8M 2M", cache="none")
        resident = sum(la["resident_bytes"] for la in stats(bases)["layers"])
        assert (resident > 0) == cached, (option, stats(bases)["layers"])
        mount.unmount()


def test_trace_file_size_is_20_bytes_per_chunk(store: Path, mnt: Path,
                                               mount_factory: MountFactory) -> None:
    """boot-traces.md: 20 bytes per chunk, a 376-byte header, 28 bytes per boot."""
    make_boot_base(store)
    layer = record_one_boot(store, mnt, mount_factory)
    (trace,) = (store / ".scache" / "traces").iterdir()
    chunks = layer["trace"]["chunks"]
    assert trace.stat().st_size == 376 + 28 + 20 * chunks + 8
    assert (traces._HEADER.size, traces._BOOT.size, traces._ENTRY.size) == (376, 28, 20)
    doc = (REPO / "docs" / "boot-traces.md").read_text()
    assert "20 bytes per chunk" in doc and "376-byte" in doc and "16 KiB chunks" in doc


def test_trace_dir_others_may_write_refused_only_by_default(
        store: Path, mnt: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    """operations.md: the default trace directory must be private; trace_dir= is trusted."""
    default = store / ".scache" / "traces"
    default.mkdir(parents=True)
    default.chmod(0o777)
    mount = mount_factory(store, mnt, "allow_other", allow=("boot traces disabled",))
    assert re.search(r"boot traces disabled: cannot use the trace directory .*mode 777",
                     mount.log()), mount.log()
    assert json.loads(run(*STAT, "--json", mnt).stdout)["trace_dir"] is None
    mount.unmount()
    chosen = tmp_path / "shared-traces"
    chosen.mkdir(mode=0o777)
    chosen.chmod(0o777)
    mount = mount_factory(store, mnt, "allow_other", f"trace_dir={chosen}")
    assert f"boot traces in {chosen}" in mount.log()
    assert json.loads(run(*STAT, "--json", mnt).stdout)["trace_dir"] == str(chosen)


def test_other_users_see_layer_keys_not_paths(
        public_dir: Path, mount_factory: MountFactory, user: object) -> None:  # noqa: F811
    """operations.md and scachefs-stat(8): a user other than root and the mount's owner
    sees `inode DEV:INO` in place of each layer's path."""
    store, mnt = public_dir / "store", public_dir / "mnt"
    store.mkdir(mode=0o755)
    mnt.mkdir(mode=0o755)
    mount_factory(store, mnt, "allow_other")
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    qemu_io(mnt / "vm.qcow2", "read -P 0xa1 0 1M", cache="none")
    assert "base.qcow2" in run(*STAT, mnt).stdout  # root
    table = run(*STAT, mnt, user=USER).stdout
    assert "base.qcow2" not in table
    assert re.search(r"^inode \d+:\d+\s", table, re.MULTILINE), table


def test_one_prometheus_path_everywhere() -> None:
    """The man page, operations.md and --help give the same textfile path."""
    from scachefs.stat import PROMETHEUS_FILE, build_parser
    man = (REPO / "docs" / "man" / "scachefs-stat.8").read_text().replace("\\-", "-")
    ops = (REPO / "docs" / "operations.md").read_text()
    assert PROMETHEUS_FILE in man and PROMETHEUS_FILE in ops
    assert PROMETHEUS_FILE in re.sub(r"\s+", "", build_parser().format_help())
    paths = set(re.findall(r"/var/lib/\S*node[_-]exporter\S*\.prom", man + ops))
    assert paths == {PROMETHEUS_FILE}, paths


def test_record_action_off_switch(store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    """boot-traces.md: `{"action": "record", "path": ..., "enabled": false}` stops the
    recording of a layer's boots; `"enabled": true` turns it back on."""
    make_boot_base(store)
    mount_factory(store, mnt, "allow_other")
    overlay(store, "vm1.qcow2", "base.qcow2")
    run("qemu-io", "-c", "read 0 4k", mnt / "vm1.qcow2")  # attaches the layer: not a boot
    assert layer_stats(mnt, "base.qcow2")["trace"]["status"] == "none"
    command = {"action": "record", "path": "base.qcow2", "enabled": False}
    run("setfattr", "-n", "user.scachefs.command", "-v", json.dumps(command), mnt)
    replay(mnt / "vm1.qcow2", boot_script(think_ms=0))
    layer = layer_stats(mnt, "base.qcow2")
    assert not layer["trace"]["recording"] and layer["trace"]["status"] != "ready", layer
    assert not list((store / ".scache" / "traces").iterdir())
    command["enabled"] = True
    run("setfattr", "-n", "user.scachefs.command", "-v", json.dumps(command), mnt)
    replay(mnt / "vm1.qcow2", boot_script(think_ms=0))
    wait_for(mnt, "base.qcow2", recorded)
    assert len(list((store / ".scache" / "traces").iterdir())) == 1
