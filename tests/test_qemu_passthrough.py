"""qemu-img and qemu-io through a real mount: overlays, backing chains, both cache modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.mounting import Mount, mount_type, require_tool, run, settle

QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"


def make_base(store: Path, name: str = "base.qcow2", size: str = "64M") -> Path:
    """A qcow2 base with recognisable patterns at known places."""
    require_tool(QEMU_IMG)
    base = store / name
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", base, size)
    run(QEMU_IO, "-c", "write -P 0xa1 0 1M", "-c", "write -P 0xb2 8M 3M",
        "-c", "write -P 0xc3 40M 64k", base)
    return settle(base)


def backing_chain(image: Path) -> list[dict[str, object]]:
    out = run(QEMU_IMG, "info", "--backing-chain", "--output=json", image).stdout
    chain: list[dict[str, object]] = json.loads(out)
    return chain


def qemu_io(image: Path, *commands: str, cache: str | None = None) -> str:
    args: list[str] = [QEMU_IO]
    if cache:
        args += ["--cache", cache]
    for command in commands:
        args += ["-c", command]
    result = run(*args, image)
    assert "Pattern verification failed" not in result.stdout + result.stderr, result.stdout
    return result.stdout


@pytest.mark.parametrize("cache", [None, "none"], ids=["default-cache", "cache-none"])
@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_overlay_create_write_read_check(store: Path, mnt: Path, mounted: Mount,
                                         cache: str | None, absolute: bool) -> None:
    make_base(store)
    backing = str(mnt / "base.qcow2") if absolute else "base.qcow2"
    overlay = mnt / "vm.qcow2"
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", overlay)

    chain = backing_chain(overlay)
    assert [Path(str(c["filename"])).name for c in chain] == ["vm.qcow2", "base.qcow2"]
    assert chain[0]["backing-filename"] == backing

    # Base data shows through the overlay; new writes land in the overlay only.
    qemu_io(overlay, "read -P 0xa1 0 1M", "read -P 0xb2 8M 3M", "read -P 0 20M 1M",
            cache=cache)
    qemu_io(overlay, "write -P 0x5e 512k 1M", "write -P 0x77 63M 4k", "flush", cache=cache)
    qemu_io(overlay, "read -P 0xa1 0 512k", "read -P 0x5e 512k 1M", "read -P 0x77 63M 4k",
            "read -P 0xb2 8M 3M", cache=cache)
    qemu_io(store / "base.qcow2", "read -P 0xa1 512k 512k")  # the base is untouched
    run(QEMU_IMG, "check", overlay)
    run(QEMU_IMG, "check", store / "vm.qcow2")


def test_convert_and_compare_agree_between_mount_and_store(store: Path, mnt: Path,
                                                          mounted: Mount) -> None:
    make_base(store)
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        store / "vm.qcow2")
    qemu_io(store / "vm.qcow2", "write -P 0x42 2M 2M")
    # Same images, once through the mount and once straight from the store.
    run(QEMU_IMG, "compare", mnt / "vm.qcow2", store / "vm.qcow2")
    run(QEMU_IMG, "convert", "-O", "raw", mnt / "vm.qcow2", mnt / "flat.raw")
    run(QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", store / "flat.raw", store / "vm.qcow2")
    run(QEMU_IMG, "convert", "-O", "qcow2", store / "vm.qcow2", store / "copy.qcow2")
    run(QEMU_IMG, "compare", mnt / "copy.qcow2", mnt / "vm.qcow2")
    # A difference is noticed: compare is not vacuous.
    qemu_io(store / "copy.qcow2", "write -P 0x43 2M 4k")
    assert run(QEMU_IMG, "compare", mnt / "copy.qcow2", mnt / "vm.qcow2",
               check=False).returncode == 1


def test_three_level_chain(store: Path, mnt: Path, mounted: Mount) -> None:
    make_base(store)
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        mnt / "tmpl.qcow2")
    qemu_io(mnt / "tmpl.qcow2", "write -P 0x99 8M 1M")
    (mnt / "vms").mkdir()
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "../tmpl.qcow2", "-F", "qcow2",
        mnt / "vms" / "vm1.qcow2")
    assert len(backing_chain(mnt / "vms" / "vm1.qcow2")) == 3
    qemu_io(mnt / "vms" / "vm1.qcow2", "read -P 0x99 8M 1M", "read -P 0xb2 9M 2M",
            "read -P 0xa1 0 1M", cache="none")


def test_mount_over_source_itself(tmp_path: Path, mount_factory: MountFactory) -> None:
    """scachefs /srv/images /srv/images: absolute backing paths keep resolving, now via us."""
    images = tmp_path / "images"
    images.mkdir()
    make_base(images)
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(images / "base.qcow2"), "-F",
        "qcow2", images / "vm.qcow2")
    qemu_io(images / "vm.qcow2", "write -P 0x3c 4M 1M")
    before = run("sha256sum", images / "base.qcow2").stdout.split()[0]

    mount = mount_factory(images, images, "allow_other")
    assert mount_type(images) == (str(images), "fuse.scachefs")
    chain = backing_chain(images / "vm.qcow2")
    assert chain[1]["filename"] == str(images / "base.qcow2")
    qemu_io(images / "vm.qcow2", "read -P 0x3c 4M 1M", "read -P 0xa1 0 1M",
            "write -P 0x3d 5M 1M", cache="none")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(images / "base.qcow2"), "-F",
        "qcow2", images / "vm2.qcow2")
    qemu_io(images / "vm2.qcow2", "read -P 0xb2 8M 3M")
    run(QEMU_IMG, "check", images / "vm.qcow2")
    assert run("sha256sum", images / "base.qcow2").stdout.split()[0] == before
    mount.unmount()
    # After unmounting, the data written through the mount is in the store itself.
    assert mount_type(images) is None or mount_type(images)[1] != "fuse.scachefs"
    qemu_io(images / "vm.qcow2", "read -P 0x3c 4M 1M", "read -P 0x3d 5M 1M")
    assert (images / "vm2.qcow2").exists()
