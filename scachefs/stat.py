"""``scachefs-stat MOUNTPOINT``: show what a live scachefs mount is doing.

The statistics themselves arrive with the operations issue; for now the command
recognises a scachefs mount from /proc/self/mountinfo and says so.
"""

from __future__ import annotations

import argparse
import os
import sys


def find_mount(path: str) -> tuple[str, str] | None:
    """(source, fstype) of the mount exactly at ``path``, from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as info:
        for line in info:
            fields = line.split()
            sep = fields.index("-")
            mount_point = fields[4].encode().decode("unicode_escape")
            if mount_point == target:
                found = (fields[sep + 2], fields[sep + 1])  # the last one stacked wins
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scachefs-stat",
                                     description="Show the statistics of a scachefs mount.")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    args = parser.parse_args(argv)
    mount = find_mount(args.mountpoint)
    if mount is None or mount[1] != "fuse.scachefs":
        what = "not a mount point" if mount is None else f"a {mount[1]} mount"
        print(f"scachefs-stat: {args.mountpoint} is not a scachefs mount ({what})",
              file=sys.stderr)
        return 1
    print(f"scachefs mount of {mount[0]} at {os.path.realpath(args.mountpoint)}: "
          "no stats yet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
