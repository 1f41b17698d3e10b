"""Mount options: parse ``-o a=b,c`` the way mount(8) and fstab users expect.

Unknown options are an error that names the option, so a typo in fstab fails the
mount loudly instead of being silently ignored. Options that only mean something
to mount(8), fstab or systemd are accepted and dropped.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable

# Options mount(8), fstab and systemd use for themselves, and filesystem-independent
# options of mount(8) that mean nothing for a FUSE file system: they reach us through
# mount(8) when an fstab line was copied from another file system, and are dropped.
IGNORED_OPTIONS = frozenset(
    {"defaults", "auto", "noauto", "nofail", "_netdev", "_rnetdev", "user", "users", "nouser",
     "owner", "group", "rw", "async", "loop",
     # Lazy timestamp writes, i_version, mandatory locks, the silent flag: superblock
     # options of disk file systems; times here are the store's.
     "lazytime", "nolazytime", "iversion", "noiversion", "mand", "nomand", "silent", "loud"}
)
# x-* and X-* are comments or other programs' options (x-systemd.*, x-initrd.mount,
# X-mount.mkdir, which mount(8) acts on itself).
IGNORED_PREFIXES = ("x-", "X-", "comment=")

# Generic VFS mount flags applied to the kernel mount (see scachefs.fuse.mount).
KERNEL_FLAGS = frozenset(
    {"ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
     "diratime", "nodiratime", "relatime", "norelatime", "strictatime", "nostrictatime",
     "sync", "dirsync", "symfollow", "nosymfollow"}
)

# Options that must not be dropped silently: the message says what to do instead.
REFUSED_OPTIONS = {
    "remount": "remount is not supported: unmount and mount again with the new options",
    "context": "SELinux context options are not supported by scachefs",
    "fscontext": "SELinux context options are not supported by scachefs",
    "defcontext": "SELinux context options are not supported by scachefs",
    "rootcontext": "SELinux context options are not supported by scachefs",
}

# The smallest cache: this many chunks, and at least one readahead window.
MIN_CACHE_CHUNKS = 4  # a smaller cache would evict what a single read just filled

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class OptionError(ValueError):
    """A mount option that is unknown or has a bad value; the message names it."""


@dataclasses.dataclass
class MountOptions:
    """Everything ``-o`` can set, with the defaults a user gets without it."""

    allow_other: bool = False
    kernel_flags: tuple[str, ...] = ()
    cache_size: int | None = None  # bytes; None means "a fraction of RAM", see cache_budget()
    chunk_size: int = 16 << 10
    readahead: int = 64 << 10  # a demand miss reads at least this aligned window
    attr_timeout: float = 10.0
    entry_timeout: float = 10.0
    threads: int = 16
    max_tasks: int = 128
    log_file: str | None = None
    boot_window: float = 120.0
    record: str = "auto"  # auto: record layers without a current trace; on; off
    trace_dir: str | None = None  # None: SOURCE/.scache/traces
    prefetch: str = "open"  # open: at a layer's first boot; mount: also at mount; off
    prefetch_rate: int = 0  # bytes/s, 0 = unlimited
    host_id: str | None = None  # None: the host name
    passthrough: str = "auto"  # auto: the kernel does plain files' I/O if it can; on; off
    layers: str = "auto"  # auto: files other images name as backing; all: every read-only file
    restart: str = "on"  # on: a holder restarts a dead daemon, which takes over the mount
    require_mount: bool = False  # refuse a SOURCE that is not (below) a mount other than /

    def cache_budget(self) -> int:
        """The cache budget in bytes: the option, or a quarter of physical RAM."""
        if self.cache_size is not None:
            return self.cache_size
        return physical_memory() // 4


def physical_memory() -> int:
    """Physical RAM in bytes (sysconf), for percentage sizes and defaults."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(text: str, name: str) -> int:
    """Parse ``512M``, ``2G``, ``1.5GiB``, ``1048576`` or ``25%`` (of RAM) into bytes."""
    value = text.strip()
    if value.endswith("%"):
        try:
            pct = float(value[:-1])
        except ValueError:
            raise OptionError(f"option {name}: bad percentage {text!r}") from None
        if not 0 < pct <= 90:
            raise OptionError(f"option {name}: percentage must be in (0, 90], got {text!r}")
        return int(physical_memory() * pct / 100)
    m = _SIZE_RE.match(value)
    if not m:
        raise OptionError(f"option {name}: bad size {text!r} (use e.g. 512M, 2G, 25%)")
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * _UNITS[unit])


def _parse_float(text: str, name: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise OptionError(f"option {name}: not a number: {text!r}") from None
    if not low <= value <= high:
        raise OptionError(f"option {name}: must be between {low:g} and {high:g}, got {text!r}")
    return value


def _parse_int(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise OptionError(f"option {name}: not an integer: {text!r}") from None
    if not low <= value <= high:
        raise OptionError(f"option {name}: must be between {low} and {high}, got {text!r}")
    return value


def _parse_choice(text: str, name: str, choices: tuple[str, ...]) -> str:
    if text not in choices:
        raise OptionError(f"option {name}: must be one of {', '.join(choices)}, got {text!r}")
    return text


def split_option_string(text: str) -> list[str]:
    """Split ``a=b,c`` on commas, honouring backslash-escaped commas as mount(8) does."""
    items: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def parse_options(option_strings: Iterable[str]) -> MountOptions:
    """Turn every ``-o`` argument into one MountOptions; later options win."""
    opts = MountOptions()
    flags: list[str] = []
    cache_text = ""
    for text in option_strings:
        for item in split_option_string(text):
            name, sep, value = item.partition("=")
            if item in IGNORED_OPTIONS or item.startswith(IGNORED_PREFIXES):
                continue
            if item in KERNEL_FLAGS:
                flags.append(item)
                continue
            if name in REFUSED_OPTIONS:
                raise OptionError(f"option {name}: {REFUSED_OPTIONS[name]}")
            if name == "allow_other" and not sep:
                opts.allow_other = True
            elif name == "require_mount" and not sep:
                opts.require_mount = True
            elif name == "default_permissions" and not sep:
                pass  # always on: the kernel checks permissions against the store's modes
            elif not sep:
                raise OptionError(f"unknown mount option {item!r} (see scachefs --help)")
            elif name == "cache_size":
                opts.cache_size = parse_size(value, name)
                cache_text = value
            elif name == "chunk_size":
                size = parse_size(value, name)
                if size < 4096 or size > (1 << 20) or size & (size - 1):
                    raise OptionError(
                        f"option chunk_size: must be a power of two from 4K to 1M, got {value!r}"
                    )
                opts.chunk_size = size
            elif name == "readahead":
                size = parse_size(value, name)
                if size > (1 << 20):
                    raise OptionError(f"option readahead: at most 1M, got {value!r}")
                opts.readahead = size
            elif name == "attr_timeout":
                opts.attr_timeout = _parse_float(value, name, 0, 86400)
            elif name == "entry_timeout":
                opts.entry_timeout = _parse_float(value, name, 0, 86400)
            elif name == "threads":
                opts.threads = _parse_int(value, name, 1, 1024)
            elif name == "boot_window":
                opts.boot_window = _parse_float(value, name, 1, 86400)
            elif name == "record":
                opts.record = _parse_choice(value, name, ("auto", "on", "off"))
            elif name == "prefetch":
                opts.prefetch = _parse_choice(value, name, ("open", "mount", "off"))
            elif name == "prefetch_rate":
                opts.prefetch_rate = parse_size(value.removesuffix("/s"), name)
            elif name == "trace_dir":
                opts.trace_dir = os.path.abspath(value)
            elif name == "host_id":
                if not value or "/" in value:
                    raise OptionError(f"option host_id: bad host id {value!r}")
                opts.host_id = value
            elif name == "log_file":
                opts.log_file = os.path.abspath(value)
            elif name == "passthrough":
                opts.passthrough = _parse_choice(value, name, ("auto", "on", "off"))
            elif name == "restart":
                opts.restart = _parse_choice(value, name, ("on", "off"))
            elif name == "layers":
                opts.layers = _parse_choice(value, name, ("auto", "all"))
            elif name == "max_tasks":
                opts.max_tasks = _parse_int(value, name, 1, 4096)
            else:
                raise OptionError(f"unknown mount option {name!r} (see scachefs --help)")
    opts.kernel_flags = tuple(dict.fromkeys(flags))
    if opts.cache_size is not None:
        least = max(MIN_CACHE_CHUNKS * opts.chunk_size, opts.readahead)
        if opts.cache_size < least:
            raise OptionError(
                f"option cache_size: {cache_text} is too small for "
                f"{_human(opts.chunk_size)} chunks: the cache needs room for at least "
                f"{MIN_CACHE_CHUNKS} chunks and one readahead window ({_human(least)}); "
                "typical sizes are 2G or 10%")
    return opts


def _human(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"
