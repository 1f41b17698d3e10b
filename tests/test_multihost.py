"""Several hosts over a real network store: sshfs and GlusterFS served from a store namespace.

Each test makes a store host and two compute hosts (network namespaces, see
tests/netns.py). Every compute host mounts the store over the network and runs
scachefs over that mount; a small storm of overlays (qemu-io replays shaped like
boots) runs on each host in turn. Measured on the store side (the bytes its link
to each host carried):

- each host reads about once the working set over the wire, not once per VM;
- the second host's first storm is prefetched from the trace the first host
  recorded in the shared store, and it records none of its own;
- with sshfs, the hosts number the base differently (sshfs hands out inode
  numbers in lookup order), and the trace is found all the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import GlusterStore, Host, Network, NsMount, SshStore
from tests.test_boot_traces import boot_script, layer_fingerprint, make_boot_base, replay_args

VMS = 3  # per host
RESULTS = Path(os.environ.get("SCACHEFS_MULTIHOST_RESULTS", "/tmp/scachefs-multihost"))
MiB = 1 << 20


def storm(host: Host, mnt: Path, names: list[str]) -> float:
    """Boot-shaped replays of ``names`` under ``mnt`` at once; the makespan in seconds."""
    script = boot_script(think_ms=1)
    start = time.monotonic()
    procs = [host.popen(*replay_args(mnt / name, script), stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT) for name in names]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and b"verification failed" not in out, out[-2000:]
    return time.monotonic() - start


def wait_layer(mount: NsMount, predicate: Callable[[dict[str, Any]], bool],
               timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        layer = mount.layer("base.qcow2")
        if predicate(layer):
            return layer
        assert time.monotonic() < deadline, f"timed out; layer stats: {layer}"
        time.sleep(0.2)


def recorded(layer: dict[str, Any]) -> bool:
    trace = layer.get("trace") or {}
    return trace.get("status") == "ready" and not trace.get("recording")


def prefetched(layer: dict[str, Any]) -> bool:
    return bool(layer.get("prefetch")) and not layer["prefetch"]["running"]


class Deployment:
    """Two compute hosts with the store mounted over the network and scachefs over it."""

    def __init__(self, net: Network, store: SshStore | GlusterStore, root: Path,
                 tmp: Path) -> None:
        self.net, self.store, self.root, self.tmp = net, store, root, tmp
        self.mounts: list[tuple[Host, Path]] = []
        self.sent_before = 0
        self.daemons: list[NsMount] = []

    def host(self, name: str, before: Callable[[Host, Path], None] | None = None
             ) -> tuple[Host, Path, NsMount]:
        host = self.net.add_host(name)
        net_mnt, mnt = self.tmp / name / "store", self.tmp / name / "mnt"
        mnt.mkdir(parents=True)
        self.store.mount(host, net_mnt)
        self.mounts.append((host, net_mnt))
        self.sent_before = self.net.sent_to(host)  # everything scachefs reads counts
        if before is not None:
            before(host, net_mnt)
        daemon = NsMount(host, net_mnt, mnt, ["allow_other", f"host_id={name}"],
                         self.tmp / f"scachefs-{name}.log")
        self.daemons.append(daemon)
        return host, mnt, daemon

    def close(self) -> list[str]:
        problems = []
        for daemon in reversed(self.daemons):
            if daemon.proc.poll() is None:
                try:
                    daemon.unmount()
                except AssertionError as exc:
                    daemon.kill()
                    problems.append(str(exc))
            bad = daemon.bad_log_lines()
            if bad:
                problems.append(f"errors in {daemon.log_path}:\n" + "\n".join(bad))
        for host, net_mnt in reversed(self.mounts):
            self.store.unmount(host, net_mnt)
        return problems


def stat_ino(host: Host, path: Path) -> int:
    return int(host.run("stat", "-c", "%i", path).stdout)


def two_host_storms(deploy: Deployment, numbering: bool) -> dict[str, Any]:
    """Host 1 boots a storm cold and records; host 2's first storm is prefetched from it."""
    net = deploy.net
    others = 6 if numbering else 0  # files host 2 looks up before the base (see below)
    for i in range(others):
        (deploy.root / f"other{i}.img").write_bytes(b"x" * 4096)

    def base_first(host: Host, net_mnt: Path) -> None:
        stat_ino(host, net_mnt / "base.qcow2")

    def others_first(host: Host, net_mnt: Path) -> None:
        for i in range(others):
            stat_ino(host, net_mnt / f"other{i}.img")

    h1, mnt1, daemon1 = deploy.host("h1", base_first)
    before = deploy.sent_before
    for i in range(VMS):
        h1.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
               mnt1 / f"h1-vm{i}.qcow2")
    first_seconds = storm(h1, mnt1, [f"h1-vm{i}.qcow2" for i in range(VMS)])
    first = wait_layer(daemon1, recorded)
    h1_bytes = net.sent_to(h1) - before
    working_set = first["trace"]["bytes"]
    traces = sorted(p.name for p in (deploy.root / ".scache" / "traces").iterdir())
    assert traces == [f"fp-{first['trace']['fingerprint']}.h1.trace"], traces
    assert first["trace"]["fingerprint"] == layer_fingerprint(deploy.root / "base.qcow2").hex()

    # Host 2 comes up later and looks up other files before the base.
    h2, mnt2, daemon2 = deploy.host("h2", others_first)
    before = deploy.sent_before
    ino1 = stat_ino(h1, deploy.mounts[0][1] / "base.qcow2")
    ino2 = stat_ino(h2, deploy.mounts[1][1] / "base.qcow2")
    if numbering:  # the network file system numbers the same file differently per host
        assert ino1 != ino2, (ino1, ino2)
    # stat(2) and ls -i under scachefs show the store's own number, whatever its size
    # (GlusterFS's are 64-bit): stable across remounts wherever the store's are.
    assert stat_ino(h1, mnt1 / "base.qcow2") == ino1
    assert stat_ino(h2, mnt2 / "base.qcow2") == ino2
    for i in range(VMS):
        h2.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
               mnt2 / f"h2-vm{i}.qcow2")
    second_seconds = storm(h2, mnt2, [f"h2-vm{i}.qcow2" for i in range(VMS)])
    second = wait_layer(daemon2, prefetched)
    h2_bytes = net.sent_to(h2) - before
    # scachefs-trace finds the store and its traces from host 2's mount point.
    listing = json.loads(h2.run(sys.executable, "-m", "scachefs.tracecli", "list", "--json",
                                mnt2).stdout)
    result = {"working_set": working_set, "h1_bytes": h1_bytes, "h2_bytes": h2_bytes,
              "h1_seconds": round(first_seconds, 2), "h2_seconds": round(second_seconds, 2),
              "inodes": (ino1, ino2), "h1_store_reads": first["store_reads"],
              "h1_daemon_store_bytes": first["store_bytes"],
              "h2_daemon_store_bytes": second["store_bytes"],
              "h2_store_reads": second["store_reads"], "prefetch": second["prefetch"],
              "trace": second["trace"], "listing": listing["traces"]}
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"multihost-{deploy.store.__class__.__name__}.json").write_text(
        json.dumps(result, indent=2))

    # Host 1: its VMS VMs read the base over the wire about once, not VMS times. (The
    # working set is the trace's 16 KiB chunks; a cold miss reads its 64 KiB window and
    # prefetch fills gaps of up to 32 KiB: ~1.5x for this scattered synthetic boot,
    # ~1.05x for a real guest's, see docs/benchmarks.md.) What crossed the wire is what
    # the daemon read, plus the protocol's few percent.
    assert 0.9 * working_set <= h1_bytes <= 1.7 * working_set, result
    assert h1_bytes <= 1.1 * first["store_bytes"] + MiB, result
    # Host 2: prefetched from host 1's trace, at its first boot ...
    pf = second["prefetch"]
    assert pf["reason"] == "first boot" and pf["error"] is None and pf["stale_chunks"] == 0
    assert pf["useful_chunks"] >= 0.9 * first["trace"]["chunks"], result
    assert second["trace"]["hosts"] == 1 and second["trace"]["status"] == "ready"
    # ... it records none of its own ...
    assert not second["trace"]["recording"]
    assert sorted(p.name for p in (deploy.root / ".scache" / "traces").iterdir()) == traces
    # ... and it read about the working set over the wire, in few large requests.
    assert 0.9 * working_set <= h2_bytes <= 1.6 * working_set, result
    assert h2_bytes <= 1.1 * second["store_bytes"] + MiB, result
    assert second["store_reads"] * 3 <= first["store_reads"], result
    assert [row["hosts"] for row in listing["traces"]] == [["h1"]], listing
    assert listing["traces"][0]["layer"] == "base.qcow2", listing
    return result


@pytest.fixture
def network(request: pytest.FixtureRequest) -> Iterator[Network]:
    net = Network(request.node.name[-8:].replace("_", ""))
    try:
        yield net
    finally:
        net.close()


@pytest.mark.timeout(300)
def test_two_hosts_over_sshfs(network: Network, tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    make_boot_base(root)
    store = SshStore(network, root, tmp_path / "ssh")
    deploy = Deployment(network, store, root, tmp_path)
    try:
        two_host_storms(deploy, numbering=True)
    finally:
        problems = deploy.close()
        store.close()
    assert not problems, problems


@pytest.mark.timeout(300)
def test_two_hosts_over_glusterfs(network: Network, tmp_path: Path) -> None:
    brick = tmp_path / "brick"
    store = GlusterStore(network, brick, tmp_path / "gluster")
    deploy: Deployment | None = None
    try:
        # The image store is the volume: write the base through a mount of it.
        writer = network.add_host("w")
        staging = tmp_path / "w" / "store"
        store.mount(writer, staging)
        writer.run("qemu-img", "create", "-q", "-f", "qcow2", staging / "base.qcow2", "128M")
        writer.run("qemu-io", "-c", "write -P 0x42 0 64M", staging / "base.qcow2")
        store.unmount(writer, staging)
        deploy = Deployment(network, store, brick, tmp_path)
        two_host_storms(deploy, numbering=False)
    finally:
        problems = deploy.close() if deploy else []
        store.close()
    assert not problems, problems
