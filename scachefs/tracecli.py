"""``scachefs-trace``: list, show, delete, export and import boot traces; warm a layer now.

Traces are files in the store's trace directory (``STORE/.scache/traces`` unless
``--trace-dir``), so list/show/delete/export/import work on the store directly,
with or without a mount. Each of them also takes the mount point of a live
scachefs mount instead of the store: the store and the trace directory are then
found through the mount's statistics (and through the daemon's own descriptors
when the mount hides them, as a mount over the store does). ``warm`` asks a live
mount to prefetch a layer now and shows a progress bar until it is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from scachefs import traces
from scachefs.control import COMMAND_XATTR
from scachefs.options import MountOptions, parse_size
from scachefs.stat import StatError, bar, find_mount, human, read_stats


@dataclasses.dataclass
class Place:
    """Where a command finds the layers and the traces."""

    store: Path  # the store's directory (or the daemon's descriptor of it)
    traces: Path  # the trace directory
    via_mount: str | None = None  # the mount point the user named, if any
    chunk_size: int | None = None  # the mount's chunk size, if a mount was named


def _daemon_fd(pid: int, path: str) -> Path | None:
    """The daemon's own open descriptor of ``path`` (for what its mount hides)."""
    base = Path(f"/proc/{pid}/fd")
    try:
        entries = sorted(base.iterdir(), key=lambda p: int(p.name))
    except OSError:
        return None
    for entry in entries:
        try:
            if os.readlink(entry) == path and entry.is_dir():
                return entry
        except OSError:
            continue
    return None


def _hidden_by(path: str, mountpoint: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")


def _reach(path: str, doc: dict[str, Any], what: str) -> Path:
    """``path`` as the daemon names it, reachable from here (SystemExit if it is not)."""
    if not _hidden_by(path, doc["mountpoint"]):
        return Path(path)
    via = _daemon_fd(doc["pid"], path)
    if via is None:
        raise SystemExit(f"scachefs-trace: the {what} {path} is hidden by the mount at "
                         f"{doc['mountpoint']} and the daemon's descriptors (/proc/"
                         f"{doc['pid']}/fd) cannot be read: run as root or as the mount's "
                         "owner")
    return via


def place(args: argparse.Namespace) -> Place:
    """The store and trace directory of STORE-OR-MOUNTPOINT (and --trace-dir)."""
    target = args.store
    mount = find_mount(target)
    if mount is not None and mount[1] == "fuse.scachefs":
        try:
            doc = read_stats(target)
        except StatError as exc:
            raise SystemExit(f"scachefs-trace: {exc}") from None
        if args.trace_dir:
            trace_path = args.trace_dir
        elif doc.get("trace_dir"):
            trace_path = doc["trace_dir"]
        elif "trace_dir" in doc:
            raise SystemExit(f"scachefs-trace: the mount at {target} keeps no traces "
                             "(record=off and prefetch=off)")
        else:  # a daemon older than the trace_dir field: the default place
            trace_path = os.path.join(doc["source"], ".scache", "traces")
        return Place(_reach(doc["source"], doc, "store"),
                     _reach(trace_path, doc, "trace directory"), target,
                     (doc.get("cache") or {}).get("chunk_size"))
    store = Path(target)
    return Place(store, Path(args.trace_dir) if args.trace_dir else store / ".scache" / "traces")


def chunk_size_of(args: argparse.Namespace, where: Place) -> int:
    """The chunk size working sets are shown at: --chunk-size, the mount's, or the default."""
    if getattr(args, "chunk_size", None):
        return int(args.chunk_size)
    return where.chunk_size or MountOptions().chunk_size


def _chunk_size_arg(text: str) -> int:
    try:
        size = parse_size(text, "--chunk-size")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < 4096 or size > (1 << 20) or size & (size - 1):
        raise argparse.ArgumentTypeError("a power of two from 4K to 1M")
    return size


def size_k(size: int) -> str:
    """A chunk size, short: 16K, 64K, 1M."""
    return f"{size >> 20}M" if size >= 1 << 20 else f"{size >> 10}K"


def recorded_at(sizes: list[int], chunk_size: int) -> str:
    """The chunk sizes traces were recorded at, and what they are shown at if it differs."""
    text = "/".join(size_k(cs) for cs in sizes)
    return text if sizes == [chunk_size] else f"{text} as {size_k(chunk_size)}"


def layer_paths(store: Path) -> dict[int, str]:
    """Inode number -> a path of that file in the store (for naming format-1 traces)."""
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


def load_all(directory: Path) -> tuple[dict[str, list[traces.TraceFile]], list[str]]:
    """Every valid trace file by key (``fp-HEX`` or ``ino-N``), and the rejected ones."""
    by_key: dict[str, list[traces.TraceFile]] = defaultdict(list)
    problems = []
    for path in sorted(directory.glob(f"*{traces.SUFFIX}")):
        raw = os.fsencode(path.name)
        fp, ino = traces.FP_NAME.match(raw), traces.INO_NAME.match(raw)
        try:
            data = path.read_bytes()[:traces.MAX_FILE_BYTES + 1]
            if fp:
                by_key[f"fp-{fp.group(1).decode()}"].append(
                    traces.decode(data, fingerprint=bytes.fromhex(fp.group(1).decode())))
            elif ino:
                by_key[f"ino-{int(ino.group(1))}"].append(
                    traces.decode(data, ino=int(ino.group(1))))
        except (ValueError, OSError) as exc:
            problems.append(f"{path}: {exc}")
    return by_key, problems


def layer_file(where: Place, layer: str) -> Path:
    return Path(layer) if os.path.isabs(layer) else where.store / layer


def layer_id(where: Place, layer: str) -> tuple[traces.LayerId, os.stat_result]:
    """The layer's fingerprint, size and mtime, read from the store (SystemExit if it cannot)."""
    path = layer_file(where, layer)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SystemExit(f"scachefs-trace: {layer}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        fp = traces.fingerprint(fd, st.st_size)
    except OSError as exc:
        raise SystemExit(f"scachefs-trace: {layer}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return traces.LayerId(fp, st.st_size, st.st_mtime_ns), st


def _name(where: Place, key: str, files: list[traces.TraceFile],
          inodes: dict[int, str] | None) -> str:
    """What to call a layer in a listing: its recorded path if that file is still it."""
    if key.startswith("ino-"):
        ino = int(key[4:])
        name = (inodes or {}).get(ino)
        return f"{name} (format 1)" if name else f"(inode {ino}, format 1, not in the store)"
    hint = max(files, key=lambda f: max((b.started for b in f.boots), default=0)).path
    if hint:
        try:
            now, _ = layer_id(where, hint)
        except SystemExit:
            return f"{hint} (gone: moved or deleted)"
        return hint if now.fingerprint == files[0].layer.fingerprint else (
            f"{hint} (changed since)")
    return f"(fingerprint {key[3:15]}...)"


def cmd_list(args: argparse.Namespace) -> int:
    where = place(args)
    directory = where.traces
    if not directory.is_dir():
        print(f"no trace directory at {directory}")
        return 0
    by_key, problems = load_all(directory)
    inodes = layer_paths(where.store) if any(k.startswith("ino-") for k in by_key) else None
    cs = chunk_size_of(args, where)
    rows: list[dict[str, Any]] = []
    for key, files in sorted(by_key.items()):
        ws = traces.merge(files, files[0].layer, cs)
        # The same boot in two files (imported twice, or back) is one boot.
        boots = {traces.boot_key(b, f.chunk_size): b for f in files for b in f.boots}
        last = max((b.started for b in boots.values()), default=0)
        sizes = sorted({f.chunk_size for f in files})
        rows.append({"layer": _name(where, key, files, inodes), "key": key,
                     "format": files[0].version, "boots": len(boots),
                     "merged_bytes": ws.bytes if ws else 0,
                     "chunks": len(ws.chunks) if ws else 0,
                     "chunk_size": cs, "recorded_chunk_sizes": sizes,
                     "converted_boots": ws.converted if ws else 0,
                     "hosts": sorted({f.host for f in files}),
                     "last_recorded": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last))})
    if args.json:
        print(json.dumps({"traces": rows, "rejected": problems}, indent=2))
        return 0
    print(f"{'LAYER':<32} {'BOOTS':>5} {'MERGED':>8} {'CHUNKS':<14} {'LAST RECORDED':<19}  "
          "HOSTS")
    for row in rows:
        print(f"{row['layer']:<32} {row['boots']:>5} {human(row['merged_bytes']):>8} "
              f"{recorded_at(row['recorded_chunk_sizes'], cs):<14} "
              f"{row['last_recorded']:<19}  {', '.join(row['hosts'])}")
    if not rows:
        print("(no traces)")
    for problem in problems:
        print(f"rejected: {problem}", file=sys.stderr)
    return 0


def _files_of(args: argparse.Namespace) -> tuple[Place, traces.LayerId, list[Path]]:
    """The layer's trace files: by fingerprint, and format-1 files of its inode number."""
    where = place(args)
    layer, st = layer_id(where, args.layer)
    directory = where.traces
    paths = sorted(directory.glob(f"fp-{layer.hex}.*{traces.SUFFIX}"))
    paths += sorted(directory.glob(f"ino-{st.st_ino}.*{traces.SUFFIX}"))
    return where, dataclasses.replace(layer, ino=st.st_ino), paths


def _decode(path: Path, layer: traces.LayerId) -> traces.TraceFile:
    data = path.read_bytes()[:traces.MAX_FILE_BYTES + 1]
    if path.name.startswith("ino-"):
        return traces.decode(data, ino=layer.ino)
    return traces.decode(data, fingerprint=layer.fingerprint)


def cmd_show(args: argparse.Namespace) -> int:
    where, layer, paths = _files_of(args)
    if not paths:
        print(f"no trace of {args.layer} (fingerprint {layer.hex})")
        return 1
    cs = chunk_size_of(args, where)
    files = []
    for path in paths:
        try:
            trace = _decode(path, layer)
        except (traces.TraceError, OSError) as exc:
            print(f"{path.name}: rejected: {exc}")
            continue
        files.append(trace)
        state = "current" if trace.layer.same_version(layer) else (
            "format 1" if trace.version == 1 else "recorded on another version")
        grain = size_k(trace.chunk_size) + (
            f" (converted to {size_k(cs)})" if trace.chunk_size != cs else "")
        print(f"{path.name}: host {trace.host}, chunk size {grain}, layer "
              f"size {human(trace.layer.size)}, {len(trace.boots)} boots ({state})")
        for boot in trace.boots:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(boot.started))
            size = human(len(boot.chunks) * trace.chunk_size)
            print(f"  {when}  {boot.requests:>6} reads  {len(boot.chunks):>6} chunks "
                  f"({size})  {boot.duration_ms / 1000:.1f} s")
    if files:
        ws = traces.merge(files, layer, cs)
        if ws:
            runs = traces.prefetch_plan(ws.chunks, ws.chunk_size, layer.size)
            others = "/".join(size_k(size) for size in ws.chunk_sizes if size != cs)
            converted = (f" ({ws.converted} converted from {others} chunks)"
                         if ws.converted else "")
            print(f"working set: {len(ws.chunks)} chunks of {size_k(cs)} ({human(ws.bytes)}) "
                  f"from {ws.boots} boots{converted} on {ws.hosts} hosts, prefetched in "
                  f"{len(runs)} reads")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    where, layer, paths = _files_of(args)
    for path in paths:
        path.unlink()
        print(f"deleted {path}")
    if not paths:
        print(f"no trace of {args.layer} (fingerprint {layer.hex})")
    notify_mounts(where.traces, where.store)
    return 0


def scachefs_mounts() -> list[tuple[str, str]]:
    """(mount point, source) of this machine's scachefs mounts, from mountinfo (no I/O on
    the mounts themselves: one of them may be hung)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as info:
        for line in info:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "fuse.scachefs":
                found.append((fields[4].encode().decode("unicode_escape"),
                              fields[sep + 2].encode().decode("unicode_escape")))
    return found


def _path_string(path: Path) -> str:
    """A path as mountinfo spells it, without touching the file system (a /proc fd link is
    read: it names the store a mount over it hides)."""
    text = str(path)
    if text.startswith("/proc/"):
        try:
            return os.readlink(text)
        except OSError:
            return text
    return os.path.abspath(text)


def _tell(mountpoint: str, target: os.stat_result) -> str | None:
    """Ask one mount to read its traces again if they are in ``target``; what happened."""
    try:
        doc = read_stats(mountpoint)
        if not doc.get("trace_dir"):
            return None
        st = _reach(doc["trace_dir"], doc, "trace directory").stat()
    except (StatError, OSError, SystemExit):
        return None
    if (st.st_dev, st.st_ino) != (target.st_dev, target.st_ino):
        return None
    try:
        os.setxattr(mountpoint, COMMAND_XATTR, json.dumps({"action": "reload_traces"}).encode())
    except OSError as exc:
        return f"could not tell the mount at {mountpoint} ({exc.strerror})"
    return "told"


def notify_mounts(directory: Path, store: Path) -> list[str]:
    """Tell this machine's live mounts of ``store`` that keep their traces in ``directory``
    to read them again.

    A mount that is not told (another user's, another store's with the same
    trace_dir, another host's, a daemon that does not answer within 5 s) notices
    the change by itself within seconds: it watches its trace directory.
    """
    try:
        target = directory.stat()
    except OSError:
        return []
    source = _path_string(store)
    told = []
    for mountpoint, mount_source in scachefs_mounts():
        if os.path.abspath(mount_source) != source:
            continue
        result: list[str | None] = []
        thread = threading.Thread(target=lambda m, out: out.append(_tell(m, target)),
                                  args=(mountpoint, result), daemon=True)
        thread.start()
        thread.join(5)
        outcome = result[0] if result else f"the mount at {mountpoint} did not answer"
        if outcome == "told":
            told.append(mountpoint)
            print(f"the mount at {mountpoint} read the traces again")
        elif outcome:
            print(f"scachefs-trace: note: {outcome}; it notices the change within seconds",
                  file=sys.stderr)
    return told


def cmd_export(args: argparse.Namespace) -> int:
    _, layer, paths = _files_of(args)
    files = []
    for path in paths:
        try:
            files.append(_decode(path, layer))
        except (traces.TraceError, OSError) as exc:
            print(f"skipping {path.name}: {exc}", file=sys.stderr)
    if not files:
        print(f"scachefs-trace: no usable trace of {args.layer}", file=sys.stderr)
        return 1
    boots = sorted((b for f in files for b in f.boots), key=lambda b: b.started)
    out = traces.TraceFile(dataclasses.replace(layer, ino=0), files[0].chunk_size, "export",
                           boots[-traces.MAX_BOOTS_PER_FILE:], args.layer)
    Path(args.output).write_bytes(traces.encode(out))
    print(f"exported {len(out.boots)} boots of {args.layer} to {args.output}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    where = place(args)
    layer, st = layer_id(where, args.layer)
    try:
        trace = traces.decode(Path(args.input).read_bytes())
    except (traces.TraceError, OSError) as exc:
        print(f"scachefs-trace: {args.input}: {exc}", file=sys.stderr)
        return 1
    if trace.layer.size != st.st_size:
        print(f"scachefs-trace: the trace is of a {trace.layer.size}-byte layer, "
              f"{args.layer} has {st.st_size} bytes", file=sys.stderr)
        return 1
    if trace.layer.fingerprint and trace.layer.fingerprint != layer.fingerprint:
        print(f"scachefs-trace: note: {args.layer} differs from the exported layer (another "
              "fingerprint); its chunk digests will show what still matches", file=sys.stderr)
    directory = where.traces
    directory.mkdir(parents=True, exist_ok=True)
    host = f"import-{args.host}"
    # Idempotent: boots the store already has for this layer (under any host: an
    # import of a boot it exported itself, or the same file twice) are not added again.
    known: set[tuple[object, ...]] = set()
    same: traces.TraceFile | None = None
    for path in sorted(directory.glob(f"fp-{layer.hex}.*{traces.SUFFIX}")):
        try:
            existing = _decode(path, layer)
        except (traces.TraceError, OSError):
            continue
        known.update(traces.boot_key(b, existing.chunk_size) for b in existing.boots)
        if path.name == traces.file_name(layer.fingerprint, host).decode():
            same = existing
    new = [b for b in trace.boots if traces.boot_key(b, trace.chunk_size) not in known]
    if not new:
        print(f"nothing to import: the store already has the {len(trace.boots)} boots of "
              f"{args.input} for {args.layer}")
        notify_mounts(directory, where.store)
        return 0
    boots = new
    if same is not None and same.chunk_size == trace.chunk_size:
        boots = sorted(same.boots + new, key=lambda b: b.started)
    elif same is not None:
        print(f"scachefs-trace: note: replacing the {len(same.boots)} boots imported as {host} "
              f"at {human(same.chunk_size)} chunks", file=sys.stderr)
    # Re-keyed to this store's copy of the layer; the chunk digests still vouch for the
    # content, so a copy that differs is caught chunk by chunk at prefetch.
    out = traces.TraceFile(layer, trace.chunk_size, host,
                           boots[-traces.MAX_BOOTS_PER_FILE:],
                           os.path.relpath(layer_file(where, args.layer), where.store))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        name = traces.TraceStore(fd, host).save(out)
    finally:
        os.close(fd)
    skipped = len(trace.boots) - len(new)
    print(f"imported {len(new)} boots for {args.layer} as host {host} in {directory / name}"
          + (f" ({skipped} the store already had)" if skipped else ""))
    notify_mounts(directory, where.store)
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
                "none", "off", "error"):
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
        p.add_argument("store", metavar="STORE|MOUNTPOINT",
                       help="the image store (SOURCE of the mount), or a scachefs mount point")
        p.add_argument("--trace-dir", help="the trace directory (default STORE/.scache/traces)")
        return p

    chunk_help = ("show working sets at this chunk size (default: the mount's, or 16K for "
                  "a store); traces recorded at another are converted")
    p = store_cmd("list", "list the traces: layer, boots merged, bytes, chunk sizes, last "
                  "recorded, hosts")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--chunk-size", type=_chunk_size_arg, metavar="SIZE", help=chunk_help)
    p.set_defaults(func=cmd_list)
    p = store_cmd("show", "show the boots and working set of one layer's traces")
    p.add_argument("layer", metavar="LAYER", help="the layer, as a path in the store")
    p.add_argument("--chunk-size", type=_chunk_size_arg, metavar="SIZE", help=chunk_help)
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
    p.add_argument("--host", default=socket.gethostname(),
                   help="keep the boots as host import-HOST (the file's name and the host "
                   "list and show report; default: this machine's name)")
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
