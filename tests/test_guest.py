"""The real Debian test guest builds once and boots from a qcow2 overlay under TCG."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.guest import MARKER, boot, ensure_guest_image
from tests.mounting import require_tool

BOOT_TIMEOUT = 300.0


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first run builds the image (a few minutes) before booting
def test_guest_boots_from_overlay(tmp_path: Path) -> None:
    require_tool("qemu-system-x86_64")
    image = ensure_guest_image()
    before = image.base.stat()
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.base),
                    "-F", "qcow2", str(overlay)], check=True)

    result = boot(overlay, image, timeout=BOOT_TIMEOUT)

    tail = result.console[-4000:]
    assert result.reached_multi_user, f"no {MARKER} within {BOOT_TIMEOUT} s; console:\n{tail}"
    assert result.seconds < BOOT_TIMEOUT
    assert result.returncode == 0, f"the guest did not power off cleanly; console:\n{tail}"
    after = image.base.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns), \
        "booting an overlay changed its base image"
    assert overlay.stat().st_size > 0
