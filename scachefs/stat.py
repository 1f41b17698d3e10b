"""``scachefs-stat MOUNTPOINT``: what a live scachefs mount is doing.

Reads the statistics document from the mount root's ``user.scachefs.stats``
extended attribute (see :mod:`scachefs.control`) and prints it as a table,
raw JSON (``--json``), Prometheus text (``--prometheus``) or a live view
(``--watch``). Never hangs on a dead or stuck mount: every read has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

from scachefs.control import STATS_XATTR

TIMEOUT = 5.0


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


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# Per-layer metrics: (name, type, help, field of the layer in the stats document).
_LAYER_METRICS = (
    ("scachefs_layer_size_bytes", "gauge", "Size of the backing layer file.", "size"),
    ("scachefs_layer_open_handles", "gauge", "Open read handles (attached VMs).",
     "open_handles"),
    ("scachefs_layer_resident_bytes", "gauge", "Bytes of the layer in the cache.",
     "resident_bytes"),
    ("scachefs_layer_served_bytes_total", "counter", "Bytes returned to readers.",
     "served_bytes"),
    ("scachefs_layer_hits_total", "counter", "Reads served from memory.", "hit_ops"),
    ("scachefs_layer_misses_total", "counter", "Reads that waited for the store.", "miss_ops"),
    ("scachefs_layer_store_read_bytes_total", "counter", "Bytes read from the store.",
     "store_bytes"),
    ("scachefs_layer_store_reads_total", "counter", "Read requests sent to the store.",
     "store_reads"),
    ("scachefs_layer_singleflight_joins_total", "counter",
     "Reads that joined a store read already in flight.", "singleflight_joins"),
    ("scachefs_layer_evictions_total", "counter", "Chunks evicted.", "evictions"),
    ("scachefs_layer_identity_changes_total", "counter",
     "Times the layer changed on the store.", "identity_changes"),
)


def format_prometheus(doc: dict[str, Any]) -> str:
    """Prometheus text exposition format (node_exporter textfile collector ready)."""
    mp = _label(doc["mountpoint"])
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str,
               samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{{{labels}}} {value:.17g}")

    base = f'mountpoint="{mp}"'
    cache, totals = doc["cache"], doc["totals"]
    metric("scachefs_up", "gauge", "1 if the mount answered.", [(base, 1)])
    metric("scachefs_uptime_seconds", "gauge", "Seconds since the mount started.",
           [(base, doc["uptime_seconds"])])
    metric("scachefs_cache_budget_bytes", "gauge", "Memory budget of the layer cache.",
           [(base, cache["budget_bytes"])])
    metric("scachefs_cache_used_bytes", "gauge", "Bytes held by the layer cache.",
           [(base, cache["used_bytes"])])
    metric("scachefs_cache_pinned_bytes", "gauge", "Cached bytes pinned for boots.",
           [(base, cache["pinned_bytes"])])
    layers = doc["layers"]

    def per_layer(field: str) -> list[tuple[str, float]]:
        def value(layer: dict[str, Any]) -> float:
            if field == "served_bytes":
                return float(layer.get("hit_bytes", 0) + layer.get("miss_bytes", 0))
            return float(layer.get(field, 0) or 0)

        return [(f'{base},layer="{_label(str(layer["path"]))}"', value(layer))
                for layer in layers]

    for name, kind, help_text, field in _LAYER_METRICS:
        metric(name, kind, help_text, per_layer(field))
    metric("scachefs_store_read_errors_total", "counter", "Store reads that failed.",
           [(base, totals["fill_errors"])])
    # The request-size histogram, cumulative as Prometheus wants it.
    hist = sorted((int(k), v) for k, v in totals["store_read_hist"].items())
    name = "scachefs_store_read_size_bytes"
    out.append(f"# HELP {name} Sizes of the reads sent to the store.")
    out.append(f"# TYPE {name} histogram")
    running = 0
    for bound, count in hist:
        running += count
        out.append(f'{name}_bucket{{{base},le="{bound}"}} {running}')
    out.append(f'{name}_bucket{{{base},le="+Inf"}} {running}')
    out.append(f"{name}_sum{{{base}}} {totals['store_bytes']}")
    out.append(f"{name}_count{{{base}}} {running}")
    return "\n".join(out) + "\n"


def watch(path: str, interval: float) -> int:
    """Refresh the table every ``interval`` seconds until interrupted."""
    try:
        while True:
            try:
                text = format_table(read_stats(path), bars=True)
            except StatError as exc:
                text = f"scachefs-stat: {exc}"
            sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") +
                             f"scachefs-stat {path} (every {interval:g} s, Ctrl-C to quit)\n\n"
                             + text + "\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def upgrade(path: str, timeout: float) -> int:
    """Ask the holder of a mount for a new daemon; wait until it serves."""
    try:
        before = read_stats(path, timeout)
        os.setxattr(path, "user.scachefs.command", b'{"action": "upgrade"}')
    except StatError as exc:
        print(f"scachefs-stat: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scachefs-stat",
        description="Show what a live scachefs mount is doing: per backing layer, the VMs "
        "attached, cached bytes, hit ratio, bytes served vs read from the store, and totals.")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="a scachefs mount point")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="print the raw JSON document")
    mode.add_argument("--prometheus", action="store_true",
                      help="print Prometheus text format (for node_exporter's textfile "
                      "collector)")
    mode.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                      help="refresh the table every SECONDS (default 2) until Ctrl-C")
    mode.add_argument("--upgrade", action="store_true",
                      help="hand the mount over to a new daemon (the scachefs code now "
                      "installed) without interrupting the VMs; waits until it serves "
                      "(root or the mount's owner)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help=f"give up on an unresponsive mount after this many seconds "
                        f"(default {TIMEOUT:g})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.watch is not None:
        return watch(args.mountpoint, max(0.2, args.watch))
    if args.upgrade:
        return upgrade(args.mountpoint, args.timeout)
    try:
        doc = read_stats(args.mountpoint, args.timeout)
    except StatError as exc:
        print(f"scachefs-stat: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
    elif args.prometheus:
        sys.stdout.write(format_prometheus(doc))
    else:
        print(format_table(doc))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # a stats thread stuck on a dead mount must not keep us alive
