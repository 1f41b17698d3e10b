"""scachefs proper: the passthrough plus the shadow cache for backing layers.

Opening a file probes its image header when it changed (keeping the shadow
current); read-only opens of a backing layer attach to the layer's shared
buffer in the chunk cache, keyed by the layer's identity, so every VM built on
that layer reads it from memory after the first reader fetched it. Everything
else, the writable top overlays above all, is plain passthrough.

Correctness rules: a layer opened for writing (``qemu-img commit``, ``rebase``)
loses its buffer before the first write can happen and is read straight from
the store until the last writer closes; a layer whose size or mtime changed on
the store gets a new identity, hence a new, empty buffer, at its next open.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import time
from collections import Counter

import pyfuse3
import trio

from scachefs import control, syscalls
from scachefs.boots import TRACE_DIR, Boots, open_trace_store
from scachefs.chunkcache import ChunkCache, LayerBuffer
from scachefs.inodes import ROOT_INODE
from scachefs.options import MountOptions
from scachefs.passthrough import OpenDir, OpenFile, Passthrough, fuse_errors, pread_full
from scachefs.prefetch import BUDGET_SHARE, Progress
from scachefs.recorder import BootSession
from scachefs.shadow import ImageNode, Key, Shadow, key_of, probe_image, scan_store
from scachefs.traces import TraceFile, WorkingSet

log = logging.getLogger(__name__)

Identity = tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns)
HIDDEN_DIR = TRACE_DIR[0]  # the store's .scache directory: never shown through the mount


def identity_of(st: os.stat_result) -> Identity:
    """A layer's identity: stable across renames and hard links, new when its data changes.

    ctime is left out on purpose: renames and links change it without changing data.
    """
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclasses.dataclass(eq=False)
class Layer:
    """A backing layer attached to the cache: its buffer and its own read descriptor."""

    key: Key
    identity: Identity
    path: str
    fd: int
    buffer: LayerBuffer = dataclasses.field(init=False)
    handles: int = 0  # open read-only handles: the VMs attached
    fills: int = 0  # store reads in flight on fd
    active: bool = True  # False once dropped: handles then read the store directly
    # Boot traces (see boots.py).
    loaded: trio.Event = dataclasses.field(default_factory=trio.Event)
    trace_files: list[TraceFile] = dataclasses.field(default_factory=list)
    trace: WorkingSet | None = None
    trace_status: str = "loading"
    should_record: bool = False
    session: BootSession | None = None
    session_owner: object = None
    progress: Progress | None = None
    prefetch_scope: trio.CancelScope | None = None
    loading: bool = False


@dataclasses.dataclass(eq=False)
class LayerHandle(OpenFile):
    """An open file that may be served from a layer's buffer."""

    layer: Layer | None = None


class ScacheFS(Passthrough):
    """The passthrough file system with backing layers served from the shared cache."""

    def __init__(self, root_fd: int, options: MountOptions, source: str,
                 mountpoint: str) -> None:
        super().__init__(root_fd, options)
        self.source, self.mountpoint = source, mountpoint
        self.owner_uid = os.getuid()
        budget = options.cache_budget()
        self.cache = ChunkCache(budget, options.chunk_size, miss_window=options.readahead,
                                pin_limit=int(budget * BUDGET_SHARE))
        self.shadow = Shadow()
        self.layers: dict[Key, Layer] = {}
        self.writers: Counter[Key] = Counter()
        self.identity_changes: Counter[Key] = Counter()
        prefixes = {mountpoint, source, os.path.realpath(mountpoint), os.path.realpath(source)}
        self.prefixes = tuple(sorted(os.fsencode(p) for p in prefixes if p != "/"))
        self.started = time.time()
        self.demand_waiting = 0  # demand reads waiting for the store: prefetch yields to them
        self.boots = Boots(open_trace_store(root_fd, options), self.cache, self.workers,
                           options, lambda: self.demand_waiting)
        self.hidden = frozenset({HIDDEN_DIR})
        self.scanned = trio.Event()  # set once the mount-time scan of the store is done
        self._evictions_seen = 0
        self._pressure_logged = -60.0

    # --------------------------------------------------------------- discovery
    async def scan(self) -> None:
        """Probe the whole store once, in the background, so the shadow knows every stack."""
        started = time.monotonic()
        nodes = await self.workers.run(scan_store, self.table.root.fd, self.prefixes,
                                       frozenset({HIDDEN_DIR}))
        for node in nodes:
            if node.key not in self.shadow.nodes:  # probes made at open are fresher
                self.shadow.update(node)
        log.info("scanned the store: %d files, %d backing layers (%.2f s)", len(nodes),
                 sum(1 for _ in self.shadow.layers()), time.monotonic() - started)

    async def _probe(self, handle: OpenFile, st: os.stat_result) -> None:
        """Re-read the header of a file that is new or changed since it was last probed."""
        if not stat.S_ISREG(st.st_mode) or not self.shadow.needs_probe(st):
            return
        if handle.flags & os.O_ACCMODE == os.O_WRONLY:
            return  # cannot read the header through this descriptor; next open will
        relpath = self.table.relpath(handle.inode)
        node: ImageNode = await self.workers.run(
            probe_image, handle.fd, st, self.table.root.fd, relpath, self.prefixes)
        self.shadow.update(node)

    # ------------------------------------------------------------------ layers
    def _attach(self, key: Key, st: os.stat_result, fd: int, path: str) -> tuple[Layer, bool]:
        """The layer's cache attachment for a new read-only handle; True if still valid."""
        identity = identity_of(st)
        layer = self.layers.get(key)
        if layer is not None and layer.identity != identity:
            self.identity_changes[key] += 1
            self._drop(key, "it changed on the store")
            layer = None
        if layer is not None:
            return layer, True
        layer = Layer(key, identity, path, os.dup(fd))
        # The cache coalesces its own reads; kernel readahead would only read more.
        os.posix_fadvise(layer.fd, 0, 0, os.POSIX_FADV_RANDOM)

        async def fill(offset: int, length: int) -> bytes:
            layer.fills += 1
            try:
                data = await self.workers.run(pread_full, layer.fd, length, offset)
                if len(data) < length:
                    log.warning("store read of layer %s at %d+%d failed: short read of %d "
                                "bytes (the file shrank?)", layer.path, offset, length,
                                len(data))
                return data
            except OSError as exc:
                log.warning("store read of layer %s at %d+%d failed: %s", layer.path, offset,
                            length, exc.strerror)
                raise
            finally:
                layer.fills -= 1
                self._release_fd(layer)
                self._watch_budget()

        layer.buffer = self.cache.layer(identity, st.st_size, fill)
        self.layers[key] = layer
        log.info("serving backing layer %s (%d MiB) from the shared cache", path,
                 st.st_size >> 20)
        return layer, False

    async def _load(self, layer: Layer) -> None:
        """Load a new layer's boot traces once; concurrent openers wait for the first."""
        if not layer.loading:
            layer.loading = True
            await self.boots.attach(layer)
        else:
            await layer.loaded.wait()

    def _watch_budget(self) -> None:
        """Say so, at most once a minute, when the budget forces evictions."""
        evictions = self.cache.total.evictions
        now = time.monotonic()
        if evictions > self._evictions_seen and now - self._pressure_logged >= 60:
            log.warning("cache budget of %d MiB is full: %d chunks evicted since the last "
                        "report; a larger cache_size would keep more of the working sets",
                        self.cache.budget_bytes >> 20, evictions - self._evictions_seen)
            self._evictions_seen, self._pressure_logged = evictions, now

    def _drop(self, key: Key, reason: str) -> None:
        """Detach a layer from the cache: its buffer goes, its handles read the store."""
        layer = self.layers.pop(key, None)
        if layer is None:
            return
        resident = layer.buffer.resident_bytes
        layer.active = False
        layer.session = layer.session_owner = None
        if layer.prefetch_scope is not None:
            layer.prefetch_scope.cancel()
        self.cache.drop_layer(layer.identity, forget=True)
        log.info("dropped the cache of layer %s (%d KiB): %s", layer.path, resident >> 10,
                 reason)
        self._release_fd(layer)

    def _release_fd(self, layer: Layer) -> None:
        """Close a dropped layer's descriptor once nothing can use it any more."""
        if not layer.active and layer.handles == 0 and layer.fills == 0 and layer.fd >= 0:
            os.close(layer.fd)  # a dup of a read-only descriptor: no I/O on close
            layer.fd = -1

    # ---------------------------------------------------------------- file ops
    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._inode(inode)

        def work() -> tuple[int, os.stat_result]:
            fd = self._reopen(node, flags)
            try:
                return fd, os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise

        fd, st = await self.workers.run(work)
        handle = LayerHandle(fd, node, flags)
        try:
            await self._probe(handle, st)
        except BaseException:
            os.close(fd)
            raise
        key = key_of(st)
        keep_cache = False
        if handle.writable:
            self.writers[key] += 1
            self._drop(key, "opened for writing")
        elif self.shadow.is_layer(key) and not self.writers[key]:
            path = self.shadow.path_of(key) or os.fsdecode(self.table.relpath(node) or b"?")
            layer, keep_cache = self._attach(key, st, fd, path)
            if not layer.loaded.is_set():
                await self._load(layer)
            if layer.progress is None and self.options.prefetch != "off":
                self.boots.start_prefetch(layer, "first boot")
            if layer.active:
                handle.layer = layer
                layer.handles += 1
                self.boots.opened(layer, handle)
        fh = self._new_fh()
        self.files[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, direct_io=False)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.files[fh]
        layer = handle.layer if isinstance(handle, LayerHandle) else None
        if layer is None or not layer.active:
            return await self.workers.run(pread_full, handle.fd, size, off)
        if layer.session is not None and layer.session_owner is handle:
            layer.session.note(off, size, time.monotonic())
        progress = layer.progress
        if progress is not None and progress.prefetched:
            cs = self.cache.chunk_size
            progress.note_demand(off // cs, (off + max(size, 1) - 1) // cs)
        data = self.cache.lookup(layer.buffer, off, size)  # hit: pure memory, no await
        if data is None:
            self.demand_waiting += 1
            try:
                data = await self.cache.read(layer.buffer, off, size)
            except OSError as exc:  # the fill that failed logged it, once for all waiters
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
            finally:
                self.demand_waiting -= 1
        return data

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.files.pop(fh)
        key = handle.inode.key
        if handle.writable:
            self.writers[key] -= 1
            if self.writers[key] <= 0:
                del self.writers[key]
        if isinstance(handle, LayerHandle) and handle.layer is not None:
            handle.layer.handles -= 1
            self.boots.released(handle.layer, handle)
            self._release_fd(handle.layer)
        await self.workers.run(os.close, handle.fd)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            node = self._inode(inode)
            self._drop(node.key, "truncated")
        return await super().setattr(inode, attr, fields, fh, ctx)

    def listing_filter(self, handle: OpenDir, names: list[bytes]) -> list[bytes]:
        if handle.inode is self.table.root:
            return [n for n in names if n not in self.hidden]
        return names

    def unlinked(self, st: os.stat_result) -> None:
        if st.st_nlink <= 1:
            self._drop(key_of(st), "deleted")
            self.shadow.remove(key_of(st))

    # -------------------------------------------------------------- background
    async def background(self, nursery: trio.Nursery) -> None:
        """Work that runs beside request handling for the life of the mount."""
        self.boots.nursery = nursery
        nursery.start_soon(self._scan_then_prefetch)
        nursery.start_soon(self.boots.watch, lambda: list(self.layers.values()))

    async def _scan_then_prefetch(self) -> None:
        try:
            await self.scan()
        finally:
            self.scanned.set()
        if self.options.prefetch == "mount":
            for key in list(self.shadow.layers()):
                path = self.shadow.path_of(key)
                if path is not None:
                    await self.warm(path, "mount")

    async def warm(self, path: str, reason: str) -> bool:
        """Attach a layer by its store path and prefetch its working set now."""
        await self.scanned.wait()  # which files are layers is known after the scan
        rel = os.fsencode(path)

        def work() -> tuple[int, os.stat_result]:
            fd = syscalls.open_beneath(self.table.root.fd, rel, os.O_RDONLY)
            return fd, os.fstat(fd)

        try:
            fd, st = await self.workers.run(work)
        except OSError as exc:
            log.warning("cannot warm %s: %s", path, exc.strerror)
            return False
        try:
            key = key_of(st)
            if not self.shadow.is_layer(key) or self.writers[key]:
                return False
            layer, _ = self._attach(key, st, fd, path)
        finally:
            os.close(fd)
        if not layer.loaded.is_set():
            await self._load(layer)
        return self.boots.start_prefetch(layer, reason)

    # --------------------------------------------------------- control channel
    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE and name == control.STATS_XATTR:
            # Layer paths may sit in directories the caller cannot list: only root
            # and the mount's owner see them.
            return control.encode_stats(self, paths=control.may_act(ctx.uid, self.owner_uid))
        return await super().getxattr(inode, name, ctx)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = await super().listxattr(inode, ctx)
        if inode == ROOT_INODE:
            names.append(control.STATS_XATTR)
        return names

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if inode == ROOT_INODE and name in (control.COMMAND_XATTR, control.STATS_XATTR):
            if name == control.STATS_XATTR:
                raise pyfuse3.FUSEError(errno.EPERM)
            try:
                self.command(value, ctx.uid)
            except control.ControlError as exc:
                log.warning("control request from uid %d refused: %s", ctx.uid, exc)
                raise pyfuse3.FUSEError(exc.errno) from None
            return
        await super().setxattr(inode, name, value, ctx)

    def command(self, value: bytes, uid: int) -> None:
        """Run one control action for a caller (the daemon checks who may act)."""
        if not control.may_act(uid, self.owner_uid):
            raise control.ControlError(errno.EPERM, "actions need root or the mount's owner")
        action, args = control.parse_command(value)
        if action == "drop":
            path = args.get("path")
            keys = [k for k, layer in self.layers.items() if path in (None, layer.path)]
            if path is not None and not keys:
                raise control.ControlError(errno.ENOENT, f"no attached layer {path!r}")
            for key in keys:  # empty the buffer; the layer stays attached
                layer = self.layers[key]
                log.info("emptied the cache of layer %s (%d KiB) on request of uid %d",
                         layer.path, layer.buffer.resident_bytes >> 10, uid)
                self.cache.drop_layer(layer.identity)
        elif action == "warm":
            path = args.get("path")
            if not isinstance(path, str):
                raise control.ControlError(errno.EINVAL, 'warm needs {"path": "..."}')
            if self.boots.nursery is None:
                raise control.ControlError(errno.EAGAIN, "not ready")
            log.info("warming %s on request of uid %d", path, uid)
            self.boots.nursery.start_soon(self.warm, path, f"requested by uid {uid}")
        elif action == "record":
            path, enabled = args.get("path"), args.get("enabled", True)
            matching = [la for la in self.layers.values() if path in (None, la.path)]
            if path is not None and not matching:
                raise control.ControlError(errno.ENOENT, f"no attached layer {path!r}")
            for layer in matching:
                layer.should_record = bool(enabled)
            log.info("recording %s for %s on request of uid %d",
                     "enabled" if enabled else "disabled", path or "all layers", uid)
        elif action == "log_level":
            level = str(args.get("level", "")).upper()
            if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                raise control.ControlError(errno.EINVAL, f"unknown log level {level!r}")
            logging.getLogger().setLevel(level)
            log.warning("log level set to %s by uid %d", level, uid)
        else:
            raise control.ControlError(errno.EINVAL, f"unknown action {action!r}")
