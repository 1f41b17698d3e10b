"""Unit tests for mount option parsing."""

from __future__ import annotations

import pytest

from scachefs.options import OptionError, parse_options, parse_size, split_option_string


def test_defaults() -> None:
    opts = parse_options([])
    assert not opts.allow_other
    assert opts.cache_size is None and opts.cache_budget() > 0
    assert opts.chunk_size == 16 << 10 and opts.readahead == 64 << 10


def test_values_and_later_options_win() -> None:
    opts = parse_options(["allow_other,cache_size=512M", "cache_size=2G,threads=8,ro"])
    assert opts.allow_other
    assert opts.cache_size == 2 << 30
    assert opts.threads == 8
    assert opts.kernel_flags == ("ro",)


@pytest.mark.parametrize("item", ["defaults", "noauto", "auto", "nofail", "_netdev", "user",
                                  "users", "rw", "x-systemd.automount",
                                  "x-systemd.requires=a.service", "comment=hello",
                                  "default_permissions", "_rnetdev", "lazytime",
                                  "nolazytime", "iversion", "noiversion", "mand", "nomand",
                                  "silent", "loud", "owner", "group", "nouser",
                                  "x-initrd.mount", "X-mount.mkdir", "X-mount.mode=0755",
                                  "x-systemd.device-timeout=10s"])
def test_fstab_only_options_are_ignored(item: str) -> None:
    assert parse_options([item]) == parse_options([])


def test_fstab_line_from_another_file_system() -> None:
    # What an ext4 or NFS line in /etc/fstab carries, plus ours.
    opts = parse_options(["defaults,lazytime,nodiratime,noatime,_rnetdev,nofail,"
                          "x-systemd.automount,X-mount.mkdir,allow_other,cache_size=2G"])
    assert opts.allow_other and opts.cache_size == 2 << 30
    assert opts.kernel_flags == ("nodiratime", "noatime")


@pytest.mark.parametrize("item", ["diratime", "nodiratime", "nostrictatime", "nosymfollow",
                                  "symfollow", "strictatime", "dirsync"])
def test_generic_vfs_flags_are_applied(item: str) -> None:
    from scachefs.fuse.mount import MountSpec
    opts = parse_options([item])
    assert opts.kernel_flags == (item,)
    MountSpec("s", "m", "scachefs", flags=opts.kernel_flags).ms_flags()  # known to mount(2)


@pytest.mark.parametrize("text, words", [
    ("cache_size=0", "too small"), ("cache_size=1K", "too small"),
    ("cache_size=63K", "64K"), ("chunk_size=1M,cache_size=3M", "4M"),
    ("remount", "unmount and mount again"), ("context=system_u:object_r:tmp_t", "SELinux")])
def test_options_refused_with_a_reason(text: str, words: str) -> None:
    with pytest.raises(OptionError, match=words):
        parse_options([text])


def test_smallest_cache_is_accepted() -> None:
    assert parse_options(["cache_size=64K"]).cache_size == 64 << 10


@pytest.mark.parametrize("text, name", [("cache_sise=1G", "cache_sise"), ("bogus", "bogus"),
                                        ("allow_other,frobnicate=3", "frobnicate")])
def test_unknown_options_name_themselves(text: str, name: str) -> None:
    with pytest.raises(OptionError, match=name):
        parse_options([text])


@pytest.mark.parametrize("text", ["cache_size=lots", "chunk_size=3000", "chunk_size=2M",
                                  "threads=0", "attr_timeout=-1", "entry_timeout=x",
                                  "cache_size=95%"])
def test_bad_values_are_errors(text: str) -> None:
    with pytest.raises(OptionError, match=text.split("=")[0]):
        parse_options([text])


@pytest.mark.parametrize("text, expected", [("1048576", 1 << 20), ("64K", 64 << 10),
                                            ("512M", 512 << 20), ("2G", 2 << 30),
                                            ("1.5GiB", 3 << 29), ("1t", 1 << 40)])
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text, "x") == expected


def test_percent_of_ram() -> None:
    assert 0 < parse_size("10%", "x") < parse_size("20%", "x")


def test_escaped_commas() -> None:
    assert split_option_string(r"a=1\,2,b,,c") == ["a=1,2", "b", "c"]
