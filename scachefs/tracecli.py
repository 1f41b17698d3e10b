"""``scachefs-trace``: list, show, delete, export and import boot traces; warm a layer now.

Traces are files in the store's trace directory (``STORE/.scache/traces`` unless
``--trace-dir``), so list/show/delete/export/import work on the store directly,
with or without a mount. ``warm`` asks a live mount to prefetch a layer now and
shows a progress bar until it is done.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from scachefs import traces
from scachefs.control import COMMAND_XATTR
from scachefs.stat import StatError, bar, human, read_stats


def trace_dir(args: argparse.Namespace) -> Path:
    return Path(args.trace_dir) if args.trace_dir else Path(args.store) / ".scache" / "traces"


def layer_paths(store: Path) -> dict[int, str]:
    """Inode number -> a path of that file in the store (for naming layers)."""
    found: dict[int, str] = {}
    for root, dirs, files in os.walk(store):
        if Path(root) == store:
            dirs[:] = [d for d in dirs if d != ".scache"]
        for name in files:
            path = Path(root) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            found.setdefault(st.st_ino, str(path.relative_to(store)))
    return found


def load_all(directory: Path) -> tuple[dict[int, list[traces.TraceFile]], list[str]]:
    """Every valid trace file by layer inode, and messages for the rejected ones."""
    by_ino: dict[int, list[traces.TraceFile]] = defaultdict(list)
    problems = []
    for path in sorted(directory.glob(f"ino-*{traces.SUFFIX}")):
        try:
            ino = int(path.name.split(".")[0][4:])
            by_ino[ino].append(traces.decode(path.read_bytes()[:traces.MAX_FILE_BYTES + 1],
                                             expect_ino=ino))
        except (ValueError, OSError) as exc:
            problems.append(f"{path}: {exc}")
    return by_ino, problems


def resolve_layer(store: Path, layer: str) -> os.stat_result:
    path = Path(layer) if os.path.isabs(layer) else store / layer
    try:
        return path.stat()
    except OSError as exc:
        raise SystemExit(f"scachefs-trace: {path}: {exc.strerror}") from None


def cmd_list(args: argparse.Namespace) -> int:
    directory = trace_dir(args)
    if not directory.is_dir():
        print(f"no trace directory at {directory}")
        return 0
    by_ino, problems = load_all(directory)
    names = layer_paths(Path(args.store))
    rows: list[dict[str, Any]] = []
    for ino, files in sorted(by_ino.items()):
        boots = [b for f in files for b in f.boots]
        ws = traces.merge(files, files[0].layer, files[0].chunk_size)
        last = max((b.started for b in boots), default=0)
        rows.append({"layer": names.get(ino, f"(inode {ino}, not in the store)"), "inode": ino,
                     "boots": len(boots), "merged_bytes": ws.bytes if ws else 0,
                     "chunks": len(ws.chunks) if ws else 0,
                     "hosts": sorted({f.host for f in files}),
                     "last_recorded": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last))})
    if args.json:
        print(json.dumps({"traces": rows, "rejected": problems}, indent=2))
        return 0
    print(f"{'LAYER':<32} {'BOOTS':>5} {'MERGED':>8} {'LAST RECORDED':<19}  HOSTS")
    for row in rows:
        print(f"{row['layer']:<32} {row['boots']:>5} {human(row['merged_bytes']):>8} "
              f"{row['last_recorded']:<19}  {', '.join(row['hosts'])}")
    if not rows:
        print("(no traces)")
    for problem in problems:
        print(f"rejected: {problem}", file=sys.stderr)
    return 0


def _files_of(args: argparse.Namespace) -> tuple[int, list[Path]]:
    st = resolve_layer(Path(args.store), args.layer)
    return st.st_ino, sorted(trace_dir(args).glob(f"ino-{st.st_ino}.*{traces.SUFFIX}"))


def cmd_show(args: argparse.Namespace) -> int:
    ino, paths = _files_of(args)
    if not paths:
        print(f"no trace of {args.layer} (inode {ino})")
        return 1
    files = []
    for path in paths:
        try:
            trace = traces.decode(path.read_bytes(), expect_ino=ino)
        except (traces.TraceError, OSError) as exc:
            print(f"{path.name}: rejected: {exc}")
            continue
        files.append(trace)
        print(f"{path.name}: host {trace.host}, chunk size {human(trace.chunk_size)}, layer "
              f"size {human(trace.layer.size)}, {len(trace.boots)} boots")
        for boot in trace.boots:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(boot.started))
            size = human(len(boot.chunks) * trace.chunk_size)
            print(f"  {when}  {boot.requests:>6} reads  {len(boot.chunks):>6} chunks "
                  f"({size})  {boot.duration_ms / 1000:.1f} s")
    if files:
        ws = traces.merge(files, files[0].layer, files[0].chunk_size)
        if ws:
            runs = traces.plan_runs(ws.chunks, ws.chunk_size, files[0].layer.size)
            print(f"working set: {len(ws.chunks)} chunks ({human(ws.bytes)}) from {ws.boots} "
                  f"boots on {ws.hosts} hosts, prefetched in {len(runs)} reads")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    ino, paths = _files_of(args)
    for path in paths:
        path.unlink()
        print(f"deleted {path}")
    if not paths:
        print(f"no trace of {args.layer} (inode {ino})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    ino, paths = _files_of(args)
    files = []
    for path in paths:
        try:
            files.append(traces.decode(path.read_bytes(), expect_ino=ino))
        except (traces.TraceError, OSError) as exc:
            print(f"skipping {path.name}: {exc}", file=sys.stderr)
    if not files:
        print(f"scachefs-trace: no usable trace of {args.layer}", file=sys.stderr)
        return 1
    boots = sorted((b for f in files for b in f.boots), key=lambda b: b.started)
    out = traces.TraceFile(files[0].layer, files[0].chunk_size, "export",
                           boots[-traces.MAX_BOOTS_PER_FILE:])
    Path(args.output).write_bytes(traces.encode(out))
    print(f"exported {len(out.boots)} boots of {args.layer} to {args.output}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    st = resolve_layer(Path(args.store), args.layer)
    try:
        trace = traces.decode(Path(args.input).read_bytes())
    except (traces.TraceError, OSError) as exc:
        print(f"scachefs-trace: {args.input}: {exc}", file=sys.stderr)
        return 1
    if trace.layer.size != st.st_size:
        print(f"scachefs-trace: the trace is of a {trace.layer.size}-byte layer, "
              f"{args.layer} has {st.st_size} bytes", file=sys.stderr)
        return 1
    # Re-key to this store's copy of the layer; the chunk digests still vouch for the
    # content, so a copy that differs is caught chunk by chunk at prefetch.
    trace.layer = traces.LayerId(st.st_ino, st.st_size, st.st_mtime_ns)
    directory = trace_dir(args)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        name = traces.TraceStore(fd, f"import-{args.host}").save(trace)
    finally:
        os.close(fd)
    print(f"imported {len(trace.boots)} boots for {args.layer} as {directory / name}")
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    try:
        read_stats(args.mountpoint)
        request = json.dumps({"action": "warm", "path": args.layer}).encode()
        os.setxattr(args.mountpoint, COMMAND_XATTR, request)
    except StatError as exc:
        print(f"scachefs-trace: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"scachefs-trace: warm refused: {exc.strerror}", file=sys.stderr)
        return 1
    start = time.monotonic()
    deadline = start + args.timeout
    seen = False
    while time.monotonic() < deadline:
        layer = next((la for la in read_stats(args.mountpoint)["layers"]
                      if la["path"] == args.layer), None)
        pf = (layer or {}).get("prefetch")
        if pf:
            seen = True
            frac = pf["done_bytes"] / pf["total_bytes"] if pf["total_bytes"] else 1.0
            sys.stdout.write(f"\r{args.layer} {bar(frac, 30)} {frac * 100:5.1f}% of "
                             f"{human(pf['total_bytes'])}")
            sys.stdout.flush()
            if not pf["running"]:
                print(f"\nwarm in {pf['seconds']:.2f} s: {human(pf['fetched_bytes'])} read in "
                      f"{pf['requests']} requests" + (" (stopped at the cache budget)"
                                                      if pf["stopped_at_budget"] else ""))
                return 0 if not pf.get("error") else 1
        elif not seen and layer is not None and (layer.get("trace") or {}).get("status") in (
                "none", "off"):
            print(f"scachefs-trace: {args.layer} has no trace to warm from", file=sys.stderr)
            return 1
        elif layer is None and time.monotonic() - start > 5:
            print(f"scachefs-trace: {args.layer} is not a backing layer of this mount (no "
                  "image names it as its backing file)", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"\nscachefs-trace: no finished prefetch of {args.layer} within {args.timeout:g} s",
          file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scachefs-trace",
        description="Manage scachefs boot traces: list, show, delete, export and import "
        "them in a store's trace directory, or warm a layer of a live mount now.")
    sub = parser.add_subparsers(dest="command", required=True)

    def store_cmd(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("store", metavar="STORE", help="the image store (SOURCE of the mount)")
        p.add_argument("--trace-dir", help="the trace directory (default STORE/.scache/traces)")
        return p

    p = store_cmd("list", "list the traces: layer, boots merged, bytes, last recorded, hosts")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)
    p = store_cmd("show", "show the boots and working set of one layer's traces")
    p.add_argument("layer", metavar="LAYER", help="the layer, as a path in the store")
    p.set_defaults(func=cmd_show)
    p = store_cmd("delete", "delete every host's traces of a layer (it is recorded afresh)")
    p.add_argument("layer", metavar="LAYER")
    p.set_defaults(func=cmd_delete)
    p = store_cmd("export", "write a layer's recent boots to one file, to ship with an image")
    p.add_argument("layer", metavar="LAYER")
    p.add_argument("output", metavar="FILE")
    p.set_defaults(func=cmd_export)
    p = store_cmd("import", "add an exported trace for a layer of this store")
    p.add_argument("layer", metavar="LAYER")
    p.add_argument("input", metavar="FILE")
    p.add_argument("--host", default=socket.gethostname(), help="name part of the new file")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("warm", help="prefetch a layer of a live mount now, with progress")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("layer", metavar="LAYER", help="the layer, as a path in the store")
    p.add_argument("--timeout", type=float, default=600, help="give up after SECONDS")
    p.set_defaults(func=cmd_warm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
