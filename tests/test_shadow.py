"""Unit tests for the shadow: probing real qemu-img images and the layer graph."""

from __future__ import annotations

import os
from pathlib import Path

from scachefs.shadow import ImageNode, Shadow, key_of, probe_image, scan_store
from tests.mounting import run


def create(path: Path, backing: str | None = None, fmt: str = "qcow2") -> None:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-u", "-b", backing, "-F", fmt]
    run(*args, path, "1M")


def probe(root: Path, rel: str, prefixes: tuple[bytes, ...] = ()) -> ImageNode:
    root_fd = os.open(root, os.O_PATH)
    fd = os.open(root / rel, os.O_RDONLY)
    try:
        return probe_image(fd, os.fstat(fd), root_fd, rel.encode(), prefixes)
    finally:
        os.close(fd)
        os.close(root_fd)


def test_relative_absolute_and_escaping_names(tmp_path: Path) -> None:
    (tmp_path / "vms").mkdir()
    create(tmp_path / "base.qcow2")
    create(tmp_path / "vms" / "rel.qcow2", "../base.qcow2")
    create(tmp_path / "vms" / "abs.qcow2", "/srv/images/base.qcow2")
    create(tmp_path / "vms" / "esc.qcow2", "../../base.qcow2")
    create(tmp_path / "vms" / "out.qcow2", "/etc/hostname", "raw")
    base_key = key_of(os.stat(tmp_path / "base.qcow2"))
    assert probe(tmp_path, "vms/rel.qcow2").backing == base_key
    assert probe(tmp_path, "vms/abs.qcow2", (b"/srv/images",)).backing == base_key
    assert "outside the store" in (probe(tmp_path, "vms/abs.qcow2").problem or "")
    assert "resolves outside the store" in (probe(tmp_path, "vms/esc.qcow2").problem or "")
    assert "is outside the store" in (probe(tmp_path, "vms/out.qcow2").problem or "")
    assert probe(tmp_path, "base.qcow2").backing is None


def test_symlinked_backing_resolves_to_the_real_file(tmp_path: Path) -> None:
    (tmp_path / "bases").mkdir()
    create(tmp_path / "bases" / "debian.qcow2")
    os.symlink("bases/debian.qcow2", tmp_path / "current.qcow2")
    create(tmp_path / "vm.qcow2", "current.qcow2")
    node = probe(tmp_path, "vm.qcow2")
    assert node.backing == key_of(os.stat(tmp_path / "bases" / "debian.qcow2"))


def test_chain_layers_loops_and_removal(tmp_path: Path) -> None:
    create(tmp_path / "base.qcow2")
    create(tmp_path / "tmpl.qcow2", "base.qcow2")
    create(tmp_path / "vm.qcow2", "tmpl.qcow2")
    create(tmp_path / "a.qcow2", "b.qcow2")
    create(tmp_path / "b.qcow2", "a.qcow2")
    root_fd = os.open(tmp_path, os.O_PATH)
    shadow = Shadow()
    for node in scan_store(root_fd, ()):
        shadow.update(node)
    os.close(root_fd)
    keys = {name: key_of(os.stat(tmp_path / name)) for name in
            ("base.qcow2", "tmpl.qcow2", "vm.qcow2", "a.qcow2", "b.qcow2")}
    assert set(shadow.layers()) == {keys["base.qcow2"], keys["tmpl.qcow2"]}
    assert not shadow.is_layer(keys["a.qcow2"]) and not shadow.is_layer(keys["b.qcow2"])
    assert "backing loop" in (shadow.nodes[keys["a.qcow2"]].problem or "")
    assert "backing loop" in (shadow.nodes[keys["b.qcow2"]].problem or "")
    shadow.remove(keys["vm.qcow2"])
    assert not shadow.is_layer(keys["tmpl.qcow2"]) and shadow.is_layer(keys["base.qcow2"])
    assert shadow.images_on(keys["base.qcow2"]) == {keys["tmpl.qcow2"]}


def test_changed_files_need_a_new_probe(tmp_path: Path) -> None:
    create(tmp_path / "img.qcow2")
    shadow = Shadow()
    st = os.stat(tmp_path / "img.qcow2")
    assert shadow.needs_probe(st)
    shadow.update(ImageNode(key_of(st), "img.qcow2", (st.st_size, st.st_mtime_ns,
                                                      st.st_ctime_ns)))
    assert not shadow.needs_probe(st)
    os.utime(tmp_path / "img.qcow2", ns=(1, 2))
    assert shadow.needs_probe(os.stat(tmp_path / "img.qcow2"))
