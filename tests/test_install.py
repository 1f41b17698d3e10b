"""`make install` / `make uninstall`: a production install that needs no checkout."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.mounting import mount_type, run

REPO = Path(__file__).resolve().parent.parent


def tree_digest(root: Path) -> dict[str, str]:
    """What each file under root holds (links: their target), by relative path."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_make_install_works_without_the_checkout(tmp_path: Path, store: Path,
                                                 mnt: Path) -> None:
    # A copy of the checkout, removed once installed.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", ".*_cache", "build", "demo", ".cache"))
    root = tmp_path / "root"
    paths = {"INSTALL_VENV": root / "opt" / "scachefs", "BINDIR": root / "bin",
             "SBINDIR": root / "sbin", "UNITDIR": root / "units", "MANDIR": root / "man",
             "DOCDIR": root / "doc"}
    make_vars = [f"{k}={v}" for k, v in paths.items()]
    out = run("make", "-C", src, "install", *make_vars, timeout=600).stdout
    assert "installed scachefs 0.1.0" in out, out
    first = tree_digest(root)
    # Idempotent: a second run leaves the same files (the venv's too, but for byte code
    # and pip's note of the temporary path the wheel was installed from).

    def kept(tree: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in tree.items() if "__pycache__" not in k
                and not k.endswith(("dist-info/direct_url.json", "dist-info/RECORD"))}

    run("make", "-C", src, "install", *make_vars, timeout=600)
    assert kept(tree_digest(root)) == kept(first)
    assert not (src / "build").exists() and not list(src.glob("*.egg-info"))  # clean source
    shutil.rmtree(src)

    bindir, venv = paths["BINDIR"], paths["INSTALL_VENV"]
    for cmd in ("scachefs", "scachefs-stat", "scachefs-trace"):
        assert os.readlink(bindir / cmd) == str(venv / "bin" / cmd)
        assert run(bindir / cmd, "--help").returncode == 0
    assert run(bindir / "scachefs", "--version").stdout.strip() == "scachefs 0.1.0"
    # Not an editable install: the code is in the venv.
    where = run(venv / "bin" / "python", "-I", "-c",
                "import scachefs, prometheus_client; print(scachefs.__file__)").stdout
    assert where.startswith(str(venv)), where
    unit = (paths["UNITDIR"] / "scachefs@.service").read_text()
    assert f"ExecStart={bindir}/scachefs -f " in unit
    for page in ("scachefs.8", "scachefs-stat.8", "scachefs-trace.8"):
        assert "NAME" in run("man", "-l", paths["MANDIR"] / "man8" / page).stdout
    assert (paths["DOCDIR"] / "examples" / "var-lib-scache.mount").exists()

    # The mount(8) helper mounts with the installed code, in the background.
    helper = paths["SBINDIR"] / "mount.fuse.scachefs"
    assert f"SCACHEFS=${{SCACHEFS:-{venv}/bin/scachefs}}" in helper.read_text()
    (store / "f").write_bytes(b"installed")
    run(helper, store, mnt, "-o", "allow_other,cache_size=64M,_netdev", timeout=60)
    try:
        assert mount_type(mnt) == (str(store), "fuse.scachefs")
        assert (mnt / "f").read_bytes() == b"installed"
        stats = run(bindir / "scachefs-stat", "--json", mnt).stdout
        assert '"schema": 1' in stats
        # A live mount runs from the venv: uninstall refuses to pull it away.
        refused = run("make", "-C", REPO, "uninstall", *make_vars, check=False)
        assert refused.returncode != 0 and "unmount the scachefs mounts first" in \
            refused.stderr + refused.stdout
        assert (venv / "bin" / "python").exists()
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    for _ in range(100):  # the holder and daemon exit after the unmount
        if not run("make", "-s", "-C", REPO, "uninstall", *make_vars,
                   check=False).returncode:
            break
        time.sleep(0.1)
    assert mount_type(mnt) is None
    assert tree_digest(root) == {}, tree_digest(root)
