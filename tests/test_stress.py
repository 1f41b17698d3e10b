"""A bounded stress run through one mount with a small cache: everything at once, then audit.

Concurrently, through one scachefs mount with cache_size=8M (so eviction never stops):

- qemu-io writers on their own overlays of a shared base (write -P, then read -P back,
  plus base data through the overlay);
- readers of the shared base itself, O_DIRECT (--cache=none) and buffered;
- readers of a TEMPLATE layer (base -> template -> overlays) reading regions that no
  commit touches, while a committer repeatedly writes one region into an overlay and
  `qemu-img commit`s it into the template through the mount;
- fio write-then-verify (crc32c) on a plain file, and fio verify-reads of a raw base
  layer that fio wrote on the store;
- renames, unlinks, mkdirs of unrelated files, directly on the store and through the mount;
- a stats poller checking the budget at every sample.

Afterwards every qcow2 is `qemu-img check`-clean, every file read through the mount is
byte-identical to the store, every image shows exactly the content the model predicts,
the last commit is visible through the mount, and the cache evicted.

The storm lasts STORM_SECONDS (20 s); SCACHEFS_SOAK_SECONDS lengthens it (`make soak`).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.mounting import Mount, run
from tests.test_shadow_cache import layer_stats, overlay, stats

MiB = 1 << 20
SEG = 4 * MiB
SEGMENTS = 16  # the base: 64 MiB, sixteen 4 MiB segments
BUDGET = 8 * MiB
STORM_SECONDS = float(os.environ.get("SCACHEFS_SOAK_SECONDS") or 20)
WRITERS = 4
TEMPLATE_OWN = {2: 0xE2, 5: 0xE5}  # segments the template itself holds
COMMIT_SEG = 12  # the one segment commits write into the template
FIO_SIZE = "32M"


def base_pattern(seg: int) -> int:
    return 0x10 + seg


def template_pattern(seg: int, committed: int | None) -> int:
    if seg == COMMIT_SEG and committed is not None:
        return committed
    return TEMPLATE_OWN.get(seg, base_pattern(seg))


def writer_region(w: int) -> tuple[int, int]:
    """(segment, offset) of writer w's own 1 MiB: 2 MiB into segment 4w + 1."""
    seg = 4 * w + 1
    return seg, seg * SEG + 2 * MiB


def qio(image: Path, *commands: str, cache: str | None = None, readonly: bool = False,
        share: bool = False) -> str:
    """qemu-io with pattern checks; raises with the output on any failure."""
    args = ["qemu-io"]
    if readonly:
        args.append("-r")
    if share:
        args.append("-U")  # no image locks: a commit may write the template meanwhile
    if cache:
        args += ["--cache", cache]
    for command in commands:
        args += ["-c", command]
    result = run(*args, image)
    out = result.stdout + result.stderr
    assert "verification failed" not in out, out
    return out


def fio(*args: str) -> str:
    # verify_state_save=0: no local-*-verify.state files left in the working directory
    result = run("fio", "--ioengine=psync", "--output-format=normal", "--verify_state_save=0",
                 *args)
    assert " err= 0" in result.stdout and "verify failed" not in result.stdout, result.stdout
    return result.stdout


@dataclass
class Storm:
    """Clients that loop until a deadline; the first failure of each is kept."""

    deadline: float
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def client(self, name: str, step: Callable[[int], None]) -> None:
        def loop() -> None:
            i = 0
            try:
                while True:
                    step(i)
                    i += 1
                    self.counts[name] = i
                    if time.monotonic() >= self.deadline:
                        return
            except Exception:
                self.failures.append(f"{name}, iteration {i}:\n{traceback.format_exc()}")

        self.counts[name] = 0
        self.threads.append(threading.Thread(target=loop, name=name, daemon=True))

    def run(self) -> None:
        for thread in self.threads:
            thread.start()
        for thread in self.threads:
            thread.join(timeout=STORM_SECONDS + 240)
            assert not thread.is_alive(), f"{thread.name} hangs"


def build_store(store: Path) -> None:
    base = store / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
    run("qemu-io", *[a for s in range(SEGMENTS)
                     for a in ("-c", f"write -P {base_pattern(s):#x} {s * SEG} {SEG}")], base)
    template = overlay(store, "template.qcow2", "base.qcow2")
    run("qemu-io", *[a for s, p in TEMPLATE_OWN.items()
                     for a in ("-c", f"write -P {p:#x} {s * SEG} {SEG}")], template)
    for w in range(WRITERS):
        overlay(store, f"vm{w}.qcow2", "base.qcow2")
    (store / "vms").mkdir()
    for r in range(2):
        overlay(store, f"vms/tr{r}.qcow2", "../template.qcow2")
    overlay(store, "vms/committer.qcow2", "../template.qcow2")
    # A raw layer with fio's verify headers, written on the store, and an image on it.
    fio(f"--filename={store / 'layer.raw'}", "--name=layer", "--rw=write", "--bs=64k",
        f"--size={FIO_SIZE}", "--verify=crc32c", "--do_verify=0")
    overlay(store, "on-raw.qcow2", "layer.raw", fmt="raw")
    (store / "junk").mkdir()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


@pytest.mark.slow
def test_storm_through_a_small_cache(store: Path, mnt: Path, mount_factory: MountFactory,
                                     tmp_path: Path) -> None:
    build_store(store)
    mount: Mount = mount_factory(store, mnt, "allow_other", "cache_size=8M")
    storm = Storm(time.monotonic() + STORM_SECONDS)
    last_write: dict[int, int] = {}
    commits: list[int] = []
    budget_samples: list[int] = []

    def writer(w: int) -> Callable[[int], None]:
        seg, off = writer_region(w)
        other = (4 * w + 3) % SEGMENTS

        def step(i: int) -> None:
            pat = 0x80 + (w * 16 + i) % 64
            qio(mnt / f"vm{w}.qcow2", f"write -P {pat:#x} {off} 1M", f"read -P {pat:#x} {off} 1M",
                f"read -P {base_pattern(seg):#x} {seg * SEG} 2M",
                f"read -P {base_pattern(seg):#x} {off + MiB} 1M",
                f"read -P {base_pattern(other):#x} {other * SEG} {SEG}",
                cache="none" if i % 2 else None)
            last_write[w] = pat
        return step

    def base_reader(cache: str | None, seed: int) -> Callable[[int], None]:
        rng = random.Random(seed)

        def step(i: int) -> None:
            segs = rng.sample(range(SEGMENTS), 4)
            qio(mnt / "base.qcow2", *[f"read -P {base_pattern(s):#x} {s * SEG} {SEG}"
                                      for s in segs], cache=cache, readonly=True)
        return step

    def template_reader(r: int) -> Callable[[int], None]:
        rng = random.Random(100 + r)
        safe = [s for s in range(SEGMENTS) if s != COMMIT_SEG]

        def step(i: int) -> None:
            segs = rng.sample(safe, 4)
            qio(mnt / "vms" / f"tr{r}.qcow2",
                *[f"read -P {template_pattern(s, None):#x} {s * SEG} {SEG}" for s in segs],
                cache="none" if r == 0 else None, readonly=True, share=True)
        return step

    def committer(i: int) -> None:
        time.sleep(1.0)  # let the readers get going (and re-attach) between commits
        pat = 0xC0 + i % 32
        image = mnt / "vms" / "committer.qcow2"
        qio(image, f"write -P {pat:#x} {COMMIT_SEG * SEG} {SEG}")
        run("qemu-img", "commit", "-q", image)
        commits.append(pat)
        # Visible at once through the mount, through the template and through an overlay.
        qio(mnt / "template.qcow2", f"read -P {pat:#x} {COMMIT_SEG * SEG} {SEG}",
            cache="none", readonly=True, share=True)
        qio(mnt / "vms" / "tr1.qcow2", f"read -P {pat:#x} {COMMIT_SEG * SEG + MiB} 64k",
            readonly=True, share=True)

    def fio_plain(i: int) -> None:
        fio(f"--filename={mnt / 'fio-plain.dat'}", "--name=plain", "--rw=randwrite",
            "--bs=4k", f"--size={FIO_SIZE}", "--verify=crc32c", "--do_verify=1",
            f"--direct={i % 2}", f"--randseed={1000 + i}")

    def fio_layer(i: int) -> None:
        fio(f"--filename={mnt / 'layer.raw'}", "--name=layer", "--rw=read", "--bs=64k",
            f"--size={FIO_SIZE}", "--verify=crc32c", "--readonly", f"--direct={i % 2}")

    def churn(i: int) -> None:
        junk, via = store / "junk", mnt / "junk"
        data = os.urandom(4096 + i)
        # Made on the store, renamed and removed through the mount.
        (junk / f"s{i}").write_bytes(data)
        os.rename(via / f"s{i}", via / f"s{i}.moved")
        assert (via / f"s{i}.moved").read_bytes() == data
        assert (junk / f"s{i}.moved").read_bytes() == data
        os.unlink(via / f"s{i}.moved")
        assert not (junk / f"s{i}.moved").exists()
        # Made through the mount, renamed and removed on the store.
        (via / f"m{i}").write_bytes(data)
        os.rename(junk / f"m{i}", junk / f"m{i}.moved")
        assert (junk / f"m{i}.moved").read_bytes() == data
        os.unlink(junk / f"m{i}.moved")
        # Directories and a rename over an existing file, through the mount.
        (via / f"d{i}").mkdir()
        (via / f"d{i}" / "f").write_bytes(data)
        (via / "target").write_bytes(b"old")
        os.replace(via / f"d{i}" / "f", via / "target")
        assert (junk / "target").read_bytes() == data
        (via / f"d{i}").rmdir()

    def poll_stats(i: int) -> None:
        doc = stats(mnt)
        assert doc["cache"]["used_bytes"] <= doc["cache"]["budget_bytes"] == BUDGET, doc["cache"]
        budget_samples.append(doc["cache"]["used_bytes"])
        time.sleep(0.25)

    for w in range(WRITERS):
        storm.client(f"writer{w}", writer(w))
    storm.client("base-reader-direct", base_reader("none", 1))
    storm.client("base-reader-buffered", base_reader(None, 2))
    for r in range(2):
        storm.client(f"template-reader{r}", template_reader(r))
    storm.client("committer", committer)
    storm.client("fio-plain-verify", fio_plain)
    storm.client("fio-layer-verify", fio_layer)
    storm.client("churn", churn)
    storm.client("stats", poll_stats)
    started = time.monotonic()
    storm.run()
    storm_seconds = time.monotonic() - started
    assert not storm.failures, "\n\n".join(storm.failures)
    assert all(n >= 1 for n in storm.counts.values()), storm.counts
    assert commits and len(last_write) == WRITERS, (commits, last_write)

    # --- the audit -------------------------------------------------------------
    doc = stats(mnt)
    assert doc["totals"]["evictions"] > 0, doc["totals"]
    assert doc["totals"]["fill_errors"] == 0
    assert doc["cache"]["used_bytes"] <= BUDGET and max(budget_samples) <= BUDGET
    layers = {layer["path"]: layer for layer in doc["layers"]}
    assert {"base.qcow2", "template.qcow2", "layer.raw"} <= set(layers), sorted(layers)
    raw_layer = layer_stats(mnt, "layer.raw")
    assert raw_layer["hit_bytes"] + raw_layer["miss_bytes"] > 0, raw_layer  # fio used the cache

    images = sorted(p.relative_to(store) for p in store.rglob("*.qcow2"))
    assert len(images) == 2 + WRITERS + 3 + 1
    for name in images:
        out = run("qemu-img", "check", mnt / name).stdout
        assert "No errors were found" in out, (name, out)

    verified = 0
    files = sorted(p.relative_to(store) for p in store.rglob("*")
                   if p.is_file() and ".scache" not in p.parts)
    for name in files:  # every byte of every file, mount against store
        assert sha256(mnt / name) == sha256(store / name), name
        verified += (store / name).stat().st_size
    for name in images:  # and every image's guest view, through both cache modes
        run("qemu-img", "compare", "-U", "-T", "none", mnt / name, store / name)
    for name in ("base.qcow2", "template.qcow2"):
        for side in (mnt, store):
            run("qemu-img", "convert", "-U", "-O", "raw", side / name,
                tmp_path / f"{side.name}.raw")
        assert sha256(tmp_path / "mnt.raw") == sha256(tmp_path / "store.raw"), name

    # The model: what each image must hold after the storm.
    committed = commits[-1]
    base_cmds = [f"read -P {base_pattern(s):#x} {s * SEG} {SEG}" for s in range(SEGMENTS)]
    template_cmds = [f"read -P {template_pattern(s, committed):#x} {s * SEG} {SEG}"
                     for s in range(SEGMENTS)]
    qio(mnt / "base.qcow2", *base_cmds, cache="none", readonly=True)
    for name in ("template.qcow2", "vms/tr0.qcow2", "vms/tr1.qcow2", "vms/committer.qcow2"):
        qio(mnt / name, *template_cmds, cache="none", readonly=True)
    for w in range(WRITERS):
        seg, off = writer_region(w)
        cmds = [c for s, c in enumerate(base_cmds) if s != seg]
        qio(mnt / f"vm{w}.qcow2", *cmds, f"read -P {base_pattern(seg):#x} {seg * SEG} 2M",
            f"read -P {last_write[w]:#x} {off} 1M",
            f"read -P {base_pattern(seg):#x} {off + MiB} 1M", cache="none", readonly=True)
    verified += (len(images) - 1) * SEGMENTS * SEG  # guest views checked against the model
    print(f"\nstorm {storm_seconds:.1f} s: {storm.counts}; {len(commits)} commits; "
          f"evictions {doc['totals']['evictions']}, store reads {doc['totals']['store_reads']}"
          f", served {(doc['totals']['hit_bytes'] + doc['totals']['miss_bytes']) >> 20} MiB; "
          f"{verified >> 20} MiB verified after it; daemon pid {mount.pid}")
