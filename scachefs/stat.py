"""``scachefs-stat MOUNTPOINT``: what a live scachefs mount is doing.

Reads the statistics document from the mount root's ``user.scachefs.stats``
extended attribute (see :mod:`scachefs.control`) and prints it as a table,
raw JSON (``--json``), Prometheus text (``--prometheus``, or written atomically
with ``--prometheus-file``) or a live view (``--watch``). Never hangs on a dead or
stuck mount: every read has a timeout.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from scachefs.control import STATS_XATTR

if TYPE_CHECKING:  # imported where used: the table and scachefs-trace do without it
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

TIMEOUT = 5.0
# The one documented place: node_exporter's textfile directory as Debian configures it.
PROMETHEUS_FILE = "/var/lib/prometheus/node-exporter/scachefs.prom"


class StatError(Exception):
    """The path is not a live scachefs mount; the message says why and what to do."""


def find_mount(path: str) -> tuple[str, str] | None:
    """(source, fstype) of the topmost mount exactly at ``path``, from mountinfo."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as info:
        for line in info:
            fields = line.split()
            sep = fields.index("-")
            mount_point = fields[4].encode().decode("unicode_escape")
            if mount_point == target:
                found = (fields[sep + 2], fields[sep + 1])
    return found


def read_stats(path: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The stats document of the mount at ``path``; StatError if there is none."""
    mount = find_mount(path)
    if mount is None or mount[1] != "fuse.scachefs":
        what = "not a mount point" if mount is None else f"a {mount[1]} mount"
        raise StatError(f"{path} is not a scachefs mount ({what})")
    result: list[bytes | BaseException] = []

    def get() -> None:
        try:
            result.append(os.getxattr(path, STATS_XATTR))
        except BaseException as exc:  # handed to the caller
            result.append(exc)

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        raise StatError(f"{path}: the scachefs daemon does not answer within {timeout:g} s "
                        "(stuck or overloaded); see docs/operations.md, troubleshooting")
    value = result[0]
    if isinstance(value, OSError):
        if value.errno == 107:  # ENOTCONN
            raise StatError(f"{path}: the scachefs daemon is dead (Transport endpoint is not "
                            f"connected); run `fusermount3 -uz {path}` and mount again")
        raise StatError(f"{path}: cannot read statistics: {value.strerror}")
    if isinstance(value, BaseException):
        raise value
    doc: dict[str, Any] = json.loads(value)
    if doc.get("schema") != 1:
        raise StatError(f"{path}: unknown statistics schema {doc.get('schema')!r}; "
                        "upgrade scachefs-stat")
    return doc


def human(n: float | None) -> str:
    """Bytes in binary units, 4 significant characters."""
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or n >= 100 else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def bar(fraction: float, width: int = 12) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _trace_cell(layer: dict[str, Any]) -> str:
    trace = layer.get("trace")
    if not trace:
        return "-"
    return str(trace.get("status", "-"))


def _prefetch_cell(layer: dict[str, Any], bars: bool) -> str:
    pf = layer.get("prefetch")
    if not pf or not pf.get("total_bytes"):
        return "-"
    frac = pf.get("done_bytes", 0) / pf["total_bytes"]
    text = f"{frac * 100:.0f}% of {human(pf['total_bytes'])}"
    if bars and pf.get("running"):
        return f"{bar(frac)} {text}"
    return text


def format_table(doc: dict[str, Any], bars: bool = False) -> str:
    """The human view: one row per backing layer, then totals."""
    cols = ["LAYER", "SIZE", "VMS", "RESIDENT", "HIT%", "SERVED", "STORE", "READS", "JOINS",
            "TRACE", "PREFETCH"]
    rows = []
    for layer in doc["layers"]:
        served = layer.get("hit_bytes", 0) + layer.get("miss_bytes", 0)
        ops = layer.get("hit_ops", 0) + layer.get("miss_ops", 0)
        rows.append([
            str(layer.get("path")), human(layer.get("size")), str(layer.get("open_handles", 0)),
            human(layer.get("resident_bytes", 0)),
            f"{100 * layer['hit_ops'] / ops:.1f}" if ops else "-",
            human(served), human(layer.get("store_bytes", 0)),
            str(layer.get("store_reads", 0)), str(layer.get("singleflight_joins", 0)),
            _trace_cell(layer), _prefetch_cell(layer, bars)])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 9, 10) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    lines = [line(cols)] + [line(row) for row in rows]
    if not rows:
        lines.append("(no backing layers found yet)")
    cache, totals = doc["cache"], doc["totals"]
    served = totals["hit_bytes"] + totals["miss_bytes"]
    lines += [
        "",
        f"mount    {doc['source']} on {doc['mountpoint']} (pid {doc['pid']}, "
        f"up {doc['uptime_seconds']:.0f} s, scachefs {doc['version']})",
        f"cache    {human(cache['used_bytes'])} of {human(cache['budget_bytes'])} used "
        f"{bar(cache['used_bytes'] / cache['budget_bytes'] if cache['budget_bytes'] else 0)}"
        f", {human(cache['pinned_bytes'])} pinned, chunks {human(cache['chunk_size'])}, "
        f"{cache['policy']}",
        f"served   {human(served)} to VMs, hit ratio {100 * totals['hit_ratio']:.1f}%, "
        f"{totals['singleflight_joins']} single-flight joins",
        f"store    {human(totals['store_bytes'])} in {totals['store_reads']} reads, "
        f"{totals['fill_errors']} errors, {totals['evictions']} evictions",
        f"images   {doc['shadow']['images']} probed, {doc['shadow']['layers']} backing layers, "
        f"{doc['shadow']['problems']} with problems (see the log)",
        _daemon_line(doc),
    ]
    if "allow_other" in doc:
        lines.append("access   allow_other: yes (every user, checked against the store's "
                     "owners and modes)" if doc["allow_other"] else
                     "access   allow_other: no: only the mounting user may use this mount; "
                     "VMs run as another user (libvirt-qemu) get Permission denied: "
                     "mount with -o allow_other")
    if doc.get("trace_dir"):
        lines.append(f"traces   {doc['trace_dir']}")
    return "\n".join(lines)


def _daemon_line(doc: dict[str, Any]) -> str:
    """Who serves: the generation, the last restart and why, and the data path."""
    fuse = doc.get("fuse") or {}
    path = ("kernel passthrough for plain files" if fuse.get("passthrough")
            else f"no passthrough ({fuse.get('passthrough_off') or 'unknown'})")
    restart = doc.get("restart")
    if restart:
        ago = max(0.0, time.time() - restart["time"])
        when = (f"generation {doc['generation']}, last restart {ago:.0f} s ago: "
                f"{restart['cause']}; counters since then")
    else:
        when = "generation 0 (never restarted)"
    return f"daemon   {when}; {path}"


# Per-layer metrics: (name, type, help, field of the layer in the stats document).
# Counter names are given without ``_total``: the client library adds it.
_LAYER_METRICS = (
    ("scachefs_layer_size_bytes", "gauge", "Size of the backing layer file.", "size"),
    ("scachefs_layer_open_handles", "gauge", "Open read handles (attached VMs).",
     "open_handles"),
    ("scachefs_layer_resident_bytes", "gauge", "Bytes of the layer in the cache.",
     "resident_bytes"),
    ("scachefs_layer_served_bytes", "counter", "Bytes returned to readers.",
     "served_bytes"),
    ("scachefs_layer_hits", "counter", "Reads served from memory.", "hit_ops"),
    ("scachefs_layer_misses", "counter", "Reads that waited for the store.", "miss_ops"),
    ("scachefs_layer_store_read_bytes", "counter", "Bytes read from the store.",
     "store_bytes"),
    ("scachefs_layer_store_reads", "counter", "Read requests sent to the store.",
     "store_reads"),
    ("scachefs_layer_singleflight_joins", "counter",
     "Reads that joined a store read already in flight.", "singleflight_joins"),
    ("scachefs_layer_evictions", "counter", "Chunks evicted.", "evictions"),
    ("scachefs_layer_identity_changes", "counter",
     "Times the layer changed on the store.", "identity_changes"),
)

# Upper bounds of the store-read size histogram: always all of them, so that the set of
# series never changes between scrapes. The daemon counts reads by size rounded up to a
# power of two, so every count falls exactly into one of these (or only +Inf, above 16M).
HISTOGRAM_BOUNDS = tuple(1 << bits for bits in range(12, 25))  # 4K .. 16M


class _Metrics:
    """A prometheus_client collector over one stats document (None: the mount is down)."""

    def __init__(self, mountpoint: str, doc: dict[str, Any] | None) -> None:
        self.mountpoint = mountpoint
        self.doc = doc

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        mp = self.doc["mountpoint"] if self.doc else self.mountpoint
        up = GaugeMetricFamily("scachefs_up", "1 if the mount answered, 0 if it is dead, "
                               "stuck or not mounted.", labels=["mountpoint"])
        up.add_metric([mp], 1 if self.doc else 0)
        yield up
        if self.doc is None:
            return
        doc = self.doc
        cache, totals = doc["cache"], doc["totals"]
        for name, help_text, value in (
                ("scachefs_uptime_seconds", "Seconds since the mount started.",
                 doc["uptime_seconds"]),
                ("scachefs_cache_budget_bytes", "Memory budget of the layer cache.",
                 cache["budget_bytes"]),
                ("scachefs_cache_used_bytes", "Bytes held by the layer cache.",
                 cache["used_bytes"]),
                ("scachefs_cache_pinned_bytes", "Cached bytes pinned for boots.",
                 cache["pinned_bytes"])):
            gauge = GaugeMetricFamily(name, help_text, labels=["mountpoint"])
            gauge.add_metric([mp], float(value))
            yield gauge
        for name, kind, help_text, field in _LAYER_METRICS:
            family: CounterMetricFamily | GaugeMetricFamily = (
                CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, help_text, labels=["mountpoint", "layer"])
            for layer in doc["layers"]:
                if field == "served_bytes":
                    value = float(layer.get("hit_bytes", 0) + layer.get("miss_bytes", 0))
                else:
                    value = float(layer.get(field, 0) or 0)
                family.add_metric([mp, str(layer["path"])], value)
            yield family
        errors = CounterMetricFamily("scachefs_store_read_errors", "Store reads that failed.",
                                     labels=["mountpoint"])
        errors.add_metric([mp], float(totals["fill_errors"]))
        yield errors
        counts = {int(k): int(v) for k, v in totals["store_read_hist"].items()}
        buckets: list[tuple[str, float]] = []
        for bound in HISTOGRAM_BOUNDS:
            buckets.append((str(bound), float(sum(v for k, v in counts.items() if k <= bound))))
        buckets.append(("+Inf", float(sum(counts.values()))))
        hist = HistogramMetricFamily("scachefs_store_read_size_bytes",
                                     "Sizes of the reads sent to the store.",
                                     labels=["mountpoint"])
        hist.add_metric([mp], buckets, float(totals["store_bytes"]))
        yield hist


def _registry(mountpoint: str, doc: dict[str, Any] | None) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Metrics(mountpoint, doc))
    return registry


def format_prometheus(doc: dict[str, Any] | None, mountpoint: str = "") -> str:
    """Prometheus text exposition format; ``doc`` None reports the mount down."""
    from prometheus_client import generate_latest

    return generate_latest(_registry(mountpoint, doc)).decode()


def write_prometheus_file(path: str, doc: dict[str, Any] | None, mountpoint: str) -> None:
    """Write the metrics to ``path`` atomically (a temporary file renamed over it), so that
    node_exporter's textfile collector never reads a half-written or empty file."""
    from prometheus_client import write_to_textfile

    write_to_textfile(path, _registry(mountpoint, doc))


def watch(path: str, interval: float, timeout: float = TIMEOUT) -> int:
    """Refresh the table every ``interval`` seconds until interrupted."""
    try:
        while True:
            try:
                text = format_table(read_stats(path, timeout), bars=True)
            except StatError as exc:
                text = f"scachefs-stat: {exc}"
            sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") +
                             f"scachefs-stat {path} (every {interval:g} s, Ctrl-C to quit)\n\n"
                             + text + "\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


NO_HOLDER = ("{path} was mounted with -o restart=off: one process serves it and there is "
             "no holder to start a new daemon and hand the mount over to it. To run the "
             "scachefs now installed, stop what uses the mount, unmount it and mount it "
             "again (drop restart=off, the default restart=on makes later upgrades "
             "possible without interrupting the VMs)")


def upgrade(path: str, timeout: float) -> int:
    """Ask the holder of a mount for a new daemon; wait until it serves."""
    try:
        before = read_stats(path, timeout)
        os.setxattr(path, "user.scachefs.command", b'{"action": "upgrade"}')
    except StatError as exc:
        print(f"scachefs-stat: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            print("scachefs-stat: upgrade refused: " + NO_HOLDER.format(path=path),
                  file=sys.stderr)
        elif exc.errno in (errno.EPERM, errno.EACCES):
            print(f"scachefs-stat: upgrade refused: {exc.strerror} (only root and the "
                  "user who mounted it may upgrade a mount)", file=sys.stderr)
        else:
            print(f"scachefs-stat: upgrade refused: {exc.strerror}", file=sys.stderr)
        return 1
    started = time.monotonic()
    deadline = started + max(timeout, 30.0)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            doc = read_stats(path, timeout)
        except StatError:
            continue
        if doc.get("generation", 0) > before.get("generation", 0):
            print(f"upgraded in {time.monotonic() - started:.2f} s: scachefs "
                  f"{before['version']} (pid {before['pid']}) -> {doc['version']} "
                  f"(pid {doc['pid']}), generation {doc['generation']}")
            return 0
    print(f"scachefs-stat: no new daemon within {deadline - started:.0f} s; see the log",
          file=sys.stderr)
    return 1


MIN_INTERVAL = 0.1
WATCH_DEFAULT = 2.0


def _seconds(text: str, what: str, low: float) -> float:
    """A positive, finite number of seconds, at least ``low``; ArgumentTypeError if not."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a number of seconds, "
                                         f"not {text!r}") from None
    if not math.isfinite(value) or value < low:
        raise argparse.ArgumentTypeError(f"{what} must be at least {low:g} seconds, "
                                         f"not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scachefs-stat",
        usage="%(prog)s [--json | --prometheus | --prometheus-file PATH | --upgrade | "
        "--watch [SECONDS]] [--timeout SECONDS] MOUNTPOINT",
        description="Show what a live scachefs mount is doing: per backing layer, the VMs "
        "attached, cached bytes, hit ratio, bytes served vs read from the store, and totals.",
        epilog="Prometheus: scachefs_up is 0 when the mount is dead, stuck or not mounted; "
        "the metrics are still written and the exit status is 0 (1 only when they could "
        "not be written). Other modes exit 1 when the mount does not answer.")
    # Optional, so that `--watch MNT` (the value is then the mount point) parses too.
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                        help="a scachefs mount point")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="print the raw JSON document")
    mode.add_argument("--prometheus", action="store_true",
                      help="print Prometheus text format; a dead mount is reported as "
                      "scachefs_up 0")
    mode.add_argument("--prometheus-file", metavar="PATH",
                      help="write Prometheus text format to PATH atomically (temporary "
                      "file, then rename), for node_exporter's textfile collector: e.g. "
                      f"{PROMETHEUS_FILE}")
    mode.add_argument("--watch", nargs="?", const="", metavar="SECONDS",
                      help=f"refresh the table every SECONDS (default {WATCH_DEFAULT:g}, at "
                      f"least {MIN_INTERVAL:g}) until Ctrl-C")
    mode.add_argument("--upgrade", action="store_true",
                      help="hand the mount over to a new daemon (the scachefs code now "
                      "installed) without interrupting the VMs; waits until it serves "
                      "(root or the mount's owner; not for restart=off mounts)")
    parser.add_argument("--timeout", type=lambda text: _seconds(text, "--timeout", 0.001),
                        default=TIMEOUT, metavar="SECONDS",
                        help=f"give up on an unresponsive mount after this many seconds "
                        f"(default {TIMEOUT:g})")
    return parser



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; ``--watch`` takes an optional number of seconds that never
    takes the mount point's place (``--watch MNT``, ``--watch 5 MNT``, ``MNT --watch 5``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.interval = None
    if args.watch is not None:
        value = args.watch
        if args.mountpoint is None and value:
            args.mountpoint, value = value, ""  # `--watch MNT`: the only argument is MNT
        try:
            args.interval = (_seconds(value, "--watch", MIN_INTERVAL) if value
                             else WATCH_DEFAULT)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    if args.mountpoint is None:
        parser.error("the following arguments are required: MOUNTPOINT")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        # As a command: die quietly of SIGPIPE like other tools when the reader of our
        # output goes away (`scachefs-stat MNT | head -2`), not with a BrokenPipeError.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = parse_args(argv)
    if args.interval is not None:
        return watch(args.mountpoint, args.interval, args.timeout)
    if args.upgrade:
        return upgrade(args.mountpoint, args.timeout)
    doc: dict[str, Any] | None
    try:
        doc = read_stats(args.mountpoint, args.timeout)
    except StatError as exc:
        print(f"scachefs-stat: {exc}", file=sys.stderr)
        if not (args.prometheus or args.prometheus_file):
            return 1
        doc = None  # reported as scachefs_up 0
    if args.prometheus_file:
        try:
            write_prometheus_file(args.prometheus_file, doc, os.path.abspath(args.mountpoint))
        except OSError as exc:
            print(f"scachefs-stat: cannot write {args.prometheus_file}: {exc.strerror}",
                  file=sys.stderr)
            return 1
    elif args.prometheus:
        sys.stdout.write(format_prometheus(doc, os.path.abspath(args.mountpoint)))
    elif args.json:
        print(json.dumps(doc, indent=2))
    else:
        assert doc is not None
        print(format_table(doc))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # a stats thread stuck on a dead mount must not keep us alive
