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
import functools
import logging
import os
import signal
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from scachefs import __version__, control, syscalls
from scachefs.arena import Arena, slots_for
from scachefs.boots import TRACE_DIR, Boots, open_trace_store
from scachefs.chunkcache import ChunkCache, ShortFill
from scachefs.fuse.ops import Attr, FuseError, Opened, Request, SetAttr
from scachefs.inodes import ROOT_INODE, Inode
from scachefs.layer import Layer, identity_of
from scachefs.options import MountOptions
from scachefs.passthrough import OpenDir, OpenFile, Passthrough, pread_full
from scachefs.prefetch import BUDGET_SHARE
from scachefs.shadow import ImageNode, Key, Shadow, key_of, probe_image, scan_store
from scachefs.takeover import KIND_LAYER

log = logging.getLogger(__name__)

HIDDEN_DIR = TRACE_DIR[0]  # the store's .scache directory: never shown through the mount
LAYER_CHECK_SECONDS = 5.0  # how often attached layers are checked for deletion or change
# A write on the store sets the file's mtime before its data lands: an identity whose
# mtime is younger than this may still get new bytes under it ("racy timestamps", as
# git's index calls them), so nothing read under it is cached until it is this old.
SETTLE_SECONDS = 2.0


def settles_in(st: os.stat_result) -> float:
    """Seconds until ``st``'s identity is old enough to cache under (0: it is already)."""
    return max(0.0, st.st_mtime_ns / 1e9 + SETTLE_SECONDS - time.time())


@dataclasses.dataclass(eq=False)
class LayerHandle(OpenFile):
    """An open file that may be served from a layer's buffer."""

    layer: Layer | None = None
    counted_writer: bool = False  # counted in ScacheFS.writers until released
    # Opened for writing beside a cached layer, not written yet (libvirt restoring an
    # owner opens O_RDWR and never writes): served by us, so its first write is seen.
    idle_writer: bool = False


def _real_parent(path: str) -> str:
    """``path`` with the symlinks of its parent resolved (the last name is not looked up)."""
    head, tail = os.path.split(path)
    return os.path.join(os.path.realpath(head), tail)


def _fstat_all(fds: list[int]) -> list[os.stat_result | None]:
    """fstat of each descriptor, None where it fails (blocking)."""
    out: list[os.stat_result | None] = []
    for fd in fds:
        try:
            out.append(os.fstat(fd))
        except OSError:
            out.append(None)
    return out


class ScacheFS(Passthrough):
    """The passthrough file system with backing layers served from the shared cache."""

    def __init__(self, root_fd: int, options: MountOptions, source: str,
                 mountpoint: str, arena_fd: int | None = None) -> None:
        super().__init__(root_fd, options)
        self.source, self.mountpoint = source, mountpoint
        self.owner_uid = os.getuid()
        budget = options.cache_budget()
        arena = None
        if arena_fd is not None:  # chunks in the holder's memfd: they survive a restart
            arena = Arena(arena_fd, options.chunk_size, slots_for(options.chunk_size, budget))
        self.cache = ChunkCache(budget, options.chunk_size, miss_window=options.readahead,
                                pin_limit=int(budget * BUDGET_SHARE), arena=arena)
        if self.cache.restored_bytes:
            log.info("the cache kept %d MiB across the restart", self.cache.restored_bytes >> 20)
        self.shadow = Shadow()
        self.layers: dict[Key, Layer] = {}
        self.writers: Counter[Key] = Counter()  # writable handles and truncates in progress
        # Bumped whenever a file may change through the mount (writers come or go, a
        # truncate): an open whose stat is older than its count takes it again.
        self.changes: Counter[Key] = Counter()
        self.identity_changes: Counter[Key] = Counter()
        # Not realpath(mountpoint) itself: a daemon that takes over an existing mount
        # would wait for its own answer to that lookup.
        prefixes = {mountpoint, source, _real_parent(mountpoint), _real_parent(source)}
        self.prefixes = tuple(sorted(os.fsencode(p) for p in prefixes if p != "/"))
        self.started = time.time()
        self.demand_waiting = 0  # demand reads waiting for the store: prefetch yields to them
        self.boots = Boots(open_trace_store(root_fd, options, source), self.cache, self.workers,
                           options, lambda: self.demand_waiting)
        self.hidden = frozenset({HIDDEN_DIR})
        self.scanned = trio.Event()  # set once the mount-time scan of the store is done
        self._evictions_seen = 0
        self._pressure_logged = -60.0
        self.generation = 0  # takeovers of this mount's connection (see daemon.py)
        self.restart: dict[str, Any] | None = None  # the last takeover: when, why, what
        self.restored_layer_files: list[int] = []  # fhs to attach to their layers again
        self.holder_pid: int | None = None  # the holder that restarts and upgrades us

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
    def _attach(self, key: Key, st: os.stat_result, fd: int, path: str) -> Layer:
        """The layer's cache attachment for a new read-only handle (no await inside)."""
        identity = identity_of(st)
        layer = self.layers.get(key)
        if layer is not None and layer.identity != identity:
            self.identity_changes[key] += 1
            self._drop(key, "it changed on the store")
            layer = None
        if layer is not None:
            return layer
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
                layer.release_fd()
                self._watch_budget()

        layer.buffer = self.cache.layer(identity, st.st_size, fill,
                                        trio.current_time() + settles_in(st))
        self.layers[key] = layer
        log.info("serving backing layer %s (%d MiB) from the shared cache", path,
                 st.st_size >> 20)
        return layer

    async def _settled_stat(self, key: Key, fd: int, st: os.stat_result,
                            seen: int) -> os.stat_result:
        """``st``, or a fresh fstat when it may be older than what the cache knows.

        Awaits happen between an open's fstat and its attach: a writer may have come
        and gone (``changes``), or another open may have attached a newer identity.
        Attaching the older stat would install a stale identity and size.
        """
        for _ in range(3):
            layer = self.layers.get(key)
            if self.changes[key] == seen and (layer is None
                                              or layer.identity == identity_of(st)):
                return st
            seen = self.changes[key]
            fresh = await self.workers.run(os.fstat, fd)
            if identity_of(fresh) == identity_of(st):
                return fresh  # confirmed: the store says what we saw
            st = fresh
        return st

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
        layer.release_fd()

    def _is_layer(self, key: Key) -> bool:
        """Whether reads of this file are served from the shared cache."""
        return self.options.layers == "all" or self.shadow.is_layer(key)

    # ---------------------------------------------------------------- writers
    def _writer_opened(self, handle: LayerHandle) -> None:
        """A writable handle exists: the file is read from the store until it closes."""
        key = handle.inode.key
        handle.counted_writer = True
        self.writers[key] += 1
        self.changes[key] += 1
        handle.inode.page_identity = None
        self._drop(key, "opened for writing")

    def _writer_closed(self, key: Key) -> None:
        self.writers[key] -= 1
        if self.writers[key] <= 0:
            del self.writers[key]
        self.changes[key] += 1

    def _changing(self, handle: OpenFile) -> None:
        """A handle is about to change its file: an idle writer becomes a writer now
        (the layer's cache goes before the change can be read)."""
        if isinstance(handle, LayerHandle) and handle.idle_writer:
            handle.idle_writer = False
            self._writer_opened(handle)

    def _new_handle(self, fd: int, node: Inode, flags: int) -> OpenFile:
        return LayerHandle(fd, node, flags)

    def created(self, handle: OpenFile) -> None:
        assert isinstance(handle, LayerHandle)
        if handle.writable:
            self._writer_opened(handle)

    # ---------------------------------------------------------------- file ops
    async def open(self, nodeid: int, flags: int, req: Request) -> Opened:
        node = self._inode(nodeid)
        seen = self.changes[node.key]
        fd, st = await self.workers.run(self._reopen, node, flags)
        handle = LayerHandle(fd, node, flags)
        try:
            return await self._serve(handle, st, seen)
        except BaseException:
            self._forget_handle(handle)
            os.close(fd)
            raise

    def _plain(self, handle: LayerHandle, st: os.stat_result) -> Opened:
        """Serve a handle as a plain file: the kernel's I/O if it can, else the store's."""
        handle.inode.page_identity = None  # the open drops the kernel's pages (no keep_cache)
        return self._opened(handle, st)

    async def _serve(self, handle: LayerHandle, st: os.stat_result, seen: int) -> Opened:
        """Decide how a new handle is served: a layer's buffer, or a plain file."""
        node = handle.inode
        await self._probe(handle, st)
        key = node.key
        if handle.writable:
            layer = self.layers.get(key)
            if layer is not None and layer.active and not handle.flags & os.O_TRUNC:
                # The cache stays until this handle changes the file: we serve it, so its
                # first write, fallocate or copy reaches us (and drops the cache) first.
                handle.idle_writer = True
                self.changes[key] += 1
                direct = self._direct_io(handle)
                self._serve_ourselves(handle, direct)
                return Opened(self._register_file(handle), direct_io=direct)
            self._writer_opened(handle)
            return self._plain(handle, st)
        # Beside a passthrough open the kernel takes passthrough opens only.
        if node.passthrough_opens or not self._is_layer(key) or self.writers[key]:
            return self._plain(handle, st)
        st = await self._settled_stat(key, handle.fd, st, seen)
        # Re-checked after the awaits: a writer may have opened meanwhile.
        if node.passthrough_opens or not self._is_layer(key) or self.writers[key]:
            return self._plain(handle, st)
        path = self.shadow.path_of(key) or os.fsdecode(self.table.relpath(node) or b"?")
        layer = self._attach(key, st, handle.fd, path)
        if not layer.loaded.is_set():
            await self._load(layer)
        if not layer.active or node.passthrough_opens:  # dropped while its traces loaded
            return self._plain(handle, st)
        if layer.progress is None and self.options.prefetch != "off":
            self.boots.start_prefetch(layer, "first boot")
        handle.layer = layer
        layer.handles += 1
        self.boots.opened(layer, handle)
        # O_DIRECT readers (qemu's cache=none) bypass the page cache: FOPEN_DIRECT_IO keeps
        # the inode out of the kernel's caching mode, so a writer can still pass through.
        direct = bool(handle.flags & os.O_DIRECT)
        # The kernel may keep its pages only if they are of this very identity, read
        # when it was settled (pages read under a fresh one may predate a write).
        keep_cache = not direct and node.page_identity == layer.identity
        settled = trio.current_time() >= layer.buffer.trusted_at
        node.page_identity = layer.identity if settled and not direct else None
        self._serve_ourselves(handle, direct)
        return Opened(self._register_file(handle), keep_cache=keep_cache, direct_io=direct,
                      noflush=True)

    def file_kind(self, handle: OpenFile) -> int:
        layer = handle.layer if isinstance(handle, LayerHandle) else None
        return super().file_kind(handle) | (KIND_LAYER if layer is not None else 0)

    def _forget_handle(self, handle: LayerHandle) -> None:
        """Undo what a handle counted (writer, layer attachment); no await, never raises."""
        if handle.counted_writer:
            handle.counted_writer = False
            self._writer_closed(handle.inode.key)
        layer, handle.layer = handle.layer, None
        if layer is not None:
            layer.handles -= 1
            self.boots.released(layer, handle)
            layer.release_fd()

    def _note(self, handle: OpenFile, layer: Layer, off: int, size: int) -> None:
        """What the boot recorder and the prefetch accounting learn from a read."""
        if layer.session is not None and layer.session_owner is handle:
            layer.session.note(off, size, time.monotonic())
        progress = layer.progress
        if progress is not None and progress.prefetched:
            cs = self.cache.chunk_size
            progress.note_demand(off // cs, (off + max(size, 1) - 1) // cs)

    def read_now(self, fh: int, offset: int,
                 size: int) -> list[bytes | memoryview] | None:
        """A read of resident layer chunks, answered on the session's read loop."""
        handle = self.files.get(fh)
        layer = handle.layer if isinstance(handle, LayerHandle) else None
        if layer is None or not layer.active:
            return None
        pieces = self.cache.lookup_pieces(layer.buffer, offset, size)  # pure memory
        if pieces is not None:
            self._note(handle, layer, offset, size)  # type: ignore[arg-type]
        return pieces

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self.files[fh]
        layer = handle.layer if isinstance(handle, LayerHandle) else None
        if layer is None or not layer.active:
            return await super().read(fh, offset, size)
        self._note(handle, layer, offset, size)
        self.demand_waiting += 1
        try:
            return await self.cache.read(layer.buffer, offset, size)
        except ShortFill:  # it shrank on the store: the store's answer is the answer
            self._changed_on_store(layer, "it shrank on the store")
            return await super().read(fh, offset, size)
        except OSError as exc:  # the fill that failed logged it, once for all waiters
            raise FuseError(exc.errno or errno.EIO) from None
        finally:
            self.demand_waiting -= 1

    async def write(self, fh: int, offset: int, data: bytes, kill_suidgid: bool) -> int:
        self._changing(self.files[fh])
        return await super().write(fh, offset, data, kill_suidgid)

    async def fallocate(self, fh: int, offset: int, length: int, mode: int,
                        req: Request) -> None:
        self._changing(self.files[fh])
        await super().fallocate(fh, offset, length, mode, req)

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                              length: int, flags: int, req: Request) -> int:
        self._changing(self.files[fh_out])
        return await super().copy_file_range(fh_in, off_in, fh_out, off_out, length, flags,
                                             req)

    async def release(self, fh: int) -> None:
        handle = self._unregister_file(fh)
        if handle is None:
            return
        if isinstance(handle, LayerHandle):
            self._forget_handle(handle)
        self._closed(handle)
        await self.workers.run(os.close, handle.fd)

    async def setattr(self, nodeid: int, changes: SetAttr, req: Request) -> Attr:
        if changes.size is None:
            return await super().setattr(nodeid, changes, req)
        key = self._inode(nodeid).key
        # A truncate is a writer while it runs: no open may attach the old identity.
        self.writers[key] += 1
        self.changes[key] += 1
        self._drop(key, "truncated")
        try:
            return await super().setattr(nodeid, changes, req)
        finally:
            self._writer_closed(key)

    def listing_filter(self, handle: OpenDir, names: list[tuple[bytes, int, int]]
                       ) -> list[tuple[bytes, int, int]]:
        if handle.inode is self.table.root:
            return [entry for entry in names if entry[0] not in self.hidden]
        return names

    def unlinked(self, st: os.stat_result) -> None:
        if st.st_nlink <= 1:
            self._drop(key_of(st), "deleted")
            self.shadow.remove(key_of(st))

    def fds_in_use(self) -> int:
        return super().fds_in_use() + len(self.layers)

    # -------------------------------------------------------------- background
    async def background(self, nursery: trio.Nursery) -> None:
        """Work that runs beside request handling for the life of the mount."""
        self.boots.nursery = nursery
        nursery.start_soon(self._scan_then_prefetch)
        nursery.start_soon(self.boots.watch, lambda: list(self.layers.values()))
        nursery.start_soon(self._check_layers)
        for fh in self.restored_layer_files:
            self.spawn(f"reattach of handle {fh}", functools.partial(self._reattach, fh))
        self.restored_layer_files = []

    def spawn(self, what: str, fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``fn`` beside request handling; a bug in it is logged, never ends the mount."""
        nursery = self.boots.nursery
        if nursery is None:
            raise control.ControlError(errno.EAGAIN, "the mount is still starting")

        async def guarded() -> None:
            try:
                await fn()
            except Exception:
                log.exception("internal error in %s", what)

        nursery.start_soon(guarded)

    def restored(self) -> None:
        """After a takeover: count the writers among the open files the tables brought back."""
        for handle in self.files.values():
            if isinstance(handle, LayerHandle) and handle.writable:
                key = handle.inode.key
                handle.counted_writer = True
                self.writers[key] += 1
                self.changes[key] += 1

    async def _reattach(self, fh: int) -> None:
        """A restored read-only handle of a layer: serve it from the cache again."""
        handle = self.files.get(fh)
        if not isinstance(handle, LayerHandle) or handle.layer is not None:
            return
        node = handle.inode
        # Our own copy: a RELEASE may close the handle's descriptor (and its number be
        # reused) while the fstat runs in a worker.
        fd = os.dup(handle.fd)
        try:
            st = await self.workers.run(os.fstat, fd)
        finally:
            os.close(fd)
        if self.files.get(fh) is not handle or node.passthrough_opens or self.writers[node.key]:
            return  # gone meanwhile, or read from the store while a writer is open
        path = self.shadow.path_of(node.key) or os.fsdecode(self.table.relpath(node) or b"?")
        layer = self._attach(node.key, st, handle.fd, path)
        handle.layer = layer
        layer.handles += 1
        self.boots.opened(layer, handle)
        if not layer.loaded.is_set():
            await self._load(layer)
        if layer.active and layer.progress is None and self.options.prefetch != "off":
            self.boots.start_prefetch(layer, "restart")

    async def _check_layers(self) -> None:
        """Let go of layers deleted or changed on the store behind the mount's back.

        Otherwise a deleted layer keeps its descriptor (and its store space) and its
        buffer for as long as the mount lives, and a changed one keeps serving the
        open handles its old bytes.
        """
        while True:
            await trio.sleep(LAYER_CHECK_SECONDS)
            layers = [la for la in self.layers.values() if la.fd >= 0]
            if not layers:
                continue
            for layer in layers:
                layer.fills += 1  # keeps each fd open (and its number ours) meanwhile

            try:
                stats = await self.workers.run(_fstat_all, [la.fd for la in layers])
            finally:
                for layer in layers:
                    layer.fills -= 1
                    layer.release_fd()
            for layer, st in zip(layers, stats, strict=True):
                if st is None or not layer.active:
                    continue
                node = self.table.find(st)
                if st.st_nlink == 0:
                    self._drop(layer.key, "deleted on the store")
                    self.shadow.remove(layer.key)
                    if node is not None and node.name:  # let the kernel forget the name
                        self._notify(self._notify_entry, node.parent, node.name)
                elif identity_of(st) != layer.identity:
                    self._changed_on_store(layer, "it changed on the store", node)

    def _changed_on_store(self, layer: Layer, reason: str, node: Inode | None = None) -> None:
        """Let go of a layer whose content changed on the store, and of the kernel's pages
        and attributes of it: its handles read the store from now on."""
        if not layer.active:
            return
        self.identity_changes[layer.key] += 1
        self._drop(layer.key, reason)
        node = node or self.table.by_key(layer.key)
        if node is not None:
            node.page_identity = None
            self._notify(self._notify_inode, node.ino)

    def _notify_entry(self, parent: int, name: bytes) -> None:
        if self.session is not None:
            self.session.notify_inval_entry(parent, name)

    def _notify_inode(self, nodeid: int) -> None:
        if self.session is not None:
            self.session.notify_inval_inode(nodeid)

    def _notify(self, fn: Callable[..., None], *args: Any) -> None:
        """Send a notification from a worker: the kernel may wait on pages for it."""
        async def send() -> None:
            try:
                await self.workers.run(fn, *args)
            except OSError as exc:
                log.debug("notification to the kernel failed: %s", exc)

        self.spawn("a notification to the kernel", send)

    async def _scan_then_prefetch(self) -> None:
        try:
            await self.scan()
        finally:
            self.scanned.set()
        if self.options.prefetch == "mount":
            for key in list(self.shadow.layers()):
                path = self.shadow.path_of(key)
                if path is None:
                    continue
                try:
                    fd, st = await self._open_to_warm(os.fsencode(path))
                except control.ControlError as exc:
                    log.warning("cannot prefetch %s at mount: %s", path, exc)
                    continue
                await self._warm(fd, st, path, "mount")

    async def _open_to_warm(self, rel: bytes) -> tuple[int, os.stat_result]:
        """Open a regular store file, by its store path, for warming; never blocks on a FIFO."""
        root = self.table.root.fd

        def work() -> tuple[int, os.stat_result]:
            path_fd = syscalls.open_beneath(root, rel, os.O_PATH)
            try:
                st = os.fstat(path_fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                os.close(path_fd)
            try:
                return fd, os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise

        try:
            return await self.workers.run(work)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise control.ControlError(err, f"{os.fsdecode(rel)}: "
                                            f"{exc.strerror or os.strerror(err)}") from None

    async def _warm(self, fd: int, st: os.stat_result, path: str, reason: str) -> bool:
        """Attach a layer (its file open as ``fd``, which this closes) and prefetch it now."""
        key = key_of(st)
        seen = self.changes[key]
        try:
            await self.scanned.wait()  # which files are layers is known after the scan
            if not self._is_layer(key) or self.writers[key]:
                log.info("not warming %s: it is not a backing layer of this mount (or is "
                         "open for writing)", path)
                return False
            st = await self._settled_stat(key, fd, st, seen)
            if not self._is_layer(key) or self.writers[key]:
                return False
            layer = self._attach(key, st, fd, path)
        finally:
            os.close(fd)
        if not layer.loaded.is_set():
            await self._load(layer)
        if not layer.active:
            return False
        return self.boots.start_prefetch(layer, reason)

    # --------------------------------------------------------- control channel
    def stats_document(self) -> dict[str, Any]:
        """Everything scachefs-stat shows, as plain JSON-able data."""
        layers = []
        keys = set(self.shadow.layers()) | set(self.layers)
        for key in sorted(keys):
            layer = self.layers.get(key)
            node = self.shadow.nodes.get(key)
            entry: dict[str, Any] = {
                "path": layer.path if layer else (node.path if node else None),
                "key": f"{key[0]}:{key[1]}",
                "images": len(self.shadow.images_on(key)),
                "attached": layer is not None,
                "identity_changes": self.identity_changes[key],
            }
            if layer is not None:
                entry.update(self.boots.stats(layer))
                buf = layer.buffer
                entry.update(identity="{}:{}:{}:{}".format(*layer.identity), size=buf.size,
                             open_handles=layer.handles, resident_bytes=buf.resident_bytes,
                             hit_ratio=round(buf.stats.hit_ratio(), 4),
                             **control.counters(buf.stats))
            else:
                entry.update(size=node.validator[0] if node else None, open_handles=0,
                             resident_bytes=0)
            layers.append(entry)
        cache = self.cache
        return {
            "schema": control.SCHEMA,
            "version": __version__,
            "pid": os.getpid(),
            "source": self.source,
            "mountpoint": self.mountpoint,
            "allow_other": self.options.allow_other,
            "trace_dir": (self.options.trace_dir
                          or os.path.join(self.source, ".scache", "traces"))
            if self.boots.store is not None else None,
            "uptime_seconds": round(time.time() - self.started, 3),
            # Takeovers of the connection; the counters count from this daemon's start.
            "generation": self.generation,
            "restart": self.restart,
            "fds": {"in_use": self.fds_in_use(), "limit": self.fd_limit},
            "fuse": {**(self.session.stats() if self.session is not None else {}),
                     "passthrough_off": self.passthrough_off,
                     "passthrough_files": sum(1 for f in self.files.values() if f.backing_id),
                     "daemon_io": dict(self.daemon_io)},
            "cache": {"budget_bytes": cache.budget_bytes, "used_bytes": cache.used_bytes,
                      "pinned_bytes": cache.pinned_bytes, "chunk_size": cache.chunk_size,
                      "policy": cache.policy},
            "totals": {**control.counters(cache.total),
                       "hit_ratio": round(cache.total.hit_ratio(), 4)},
            "shadow": {"images": len(self.shadow), "layers": len(keys),
                       "problems": sum(1 for n in self.shadow.nodes.values() if n.problem)},
            "layers": layers,
        }

    async def getxattr(self, nodeid: int, name: bytes, req: Request) -> bytes:
        # The statistics and the command are names the root answers, not attributes it
        # has: listxattr shows the store's own (`getfattr -d` and copies of the mount's
        # root see what the store has, nothing more).
        if nodeid == ROOT_INODE and name == control.STATS_XATTR:
            # Layer paths may sit in directories the caller cannot list: only root
            # and the mount's owner see them.
            return control.encode_stats(self.stats_document(),
                                        paths=control.may_act(req.uid, self.owner_uid))
        return await super().getxattr(nodeid, name, req)

    async def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int,
                       req: Request) -> None:
        if nodeid == ROOT_INODE and name in (control.COMMAND_XATTR, control.STATS_XATTR):
            if name == control.STATS_XATTR:
                raise FuseError(errno.EPERM)
            try:
                await self.command(value, req.uid)
            except control.ControlError as exc:
                log.warning("control request from uid %d refused: %s", req.uid, exc)
                raise FuseError(exc.errno) from None
            return
        await super().setxattr(nodeid, name, value, flags, req)

    async def command(self, value: bytes, uid: int) -> None:
        """Run one control action for a caller (the daemon checks who may act)."""
        if not control.may_act(uid, self.owner_uid):
            raise control.ControlError(errno.EPERM, "actions need root or the mount's owner")
        action, args = control.parse_command(value)
        if action == "drop":
            path = control.optional_str(args, "path")
            keys = [k for k, layer in self.layers.items() if path in (None, layer.path)]
            if path is not None and not keys:
                raise control.ControlError(errno.ENOENT, f"no attached layer {path!r}")
            for key in keys:  # empty the buffer; the layer stays attached
                layer = self.layers[key]
                log.info("emptied the cache of layer %s (%d KiB) on request of uid %d",
                         layer.path, layer.buffer.resident_bytes >> 10, uid)
                self.cache.drop_layer(layer.identity)
        elif action == "warm":
            rel = control.store_path(args, self.prefixes)
            shown = os.fsdecode(rel)
            if self.boots.nursery is None:
                raise control.ControlError(errno.EAGAIN, "the mount is still starting")
            fd, st = await self._open_to_warm(rel)
            log.info("warming %s on request of uid %d", shown, uid)
            reason = f"requested by uid {uid}"
            self.spawn(f"warm {shown}", lambda: self._warm(fd, st, shown, reason))
        elif action == "record":
            path, enabled = control.optional_str(args, "path"), args.get("enabled", True)
            matching = [la for la in self.layers.values() if path in (None, la.path)]
            if path is not None and not matching:
                raise control.ControlError(errno.ENOENT, f"no attached layer {path!r}")
            for layer in matching:
                layer.should_record = bool(enabled)
            log.info("recording %s for %s on request of uid %d",
                     "enabled" if enabled else "disabled", path or "all layers", uid)
        elif action == "reload_traces":  # scachefs-trace changed the trace directory
            path = control.optional_str(args, "path")
            await self.boots.reload([la for la in self.layers.values()
                                     if path in (None, la.path)])
        elif action == "upgrade":
            if self.holder_pid is None:
                raise control.ControlError(errno.EOPNOTSUPP, "this mount has no holder to "
                                           "hand over to (restart=off)")
            log.info("upgrade requested by uid %d", uid)
            os.kill(self.holder_pid, signal.SIGHUP)
        elif action == "log_level":
            level = str(args.get("level", "")).upper()
            if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                raise control.ControlError(errno.EINVAL, f"unknown log level {level!r}")
            logging.getLogger().setLevel(level)
            if self.session is not None:
                self.session.log_requests(level == "DEBUG")
            log.warning("log level set to %s by uid %d", level, uid)
        else:
            raise control.ControlError(errno.EINVAL, f"unknown action {action!r}")
