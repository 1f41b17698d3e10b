"""Boot traces of layers: record boot sessions, keep traces in the store, prefetch them.

:class:`Boots` is the part of the file system that deals with boots. The file
system tells it when a layer is attached, opened, read and released; it decides
which handle's reads are recorded, saves finished boots to the trace store
(worker threads), merges every host's traces into a working set, and starts the
prefetch of that working set at a layer's first boot, at mount time
(``prefetch=mount``) or on request (the ``warm`` action).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

import trio
import xxhash

from scachefs import prefetch, traces
from scachefs.chunkcache import ChunkCache
from scachefs.layer import Layer
from scachefs.options import MountOptions
from scachefs.recorder import MIN_REQUESTS, BootSession
from scachefs.traces import Boot, LayerId, TraceFile, TraceStore
from scachefs.workers import WorkerPool

log = logging.getLogger(__name__)

TRACE_DIR = (b".scache", b"traces")
QUIET_SECONDS = 30.0  # a boot session whose reads stopped this long has ended
TRACE_DIR_CHECK_SECONDS = 5.0  # how often the trace directory is checked for changes


def open_trace_store(root_fd: int, options: MountOptions,
                     source: str = "SOURCE") -> TraceStore | None:
    """Open (creating it if needed) the trace directory; None, with a warning, if impossible."""
    host = options.host_id or socket.gethostname() or "host"
    if options.record == "off" and options.prefetch == "off":
        return None
    where = options.trace_dir or os.path.join(source, ".scache", "traces")
    try:
        if options.trace_dir:
            os.makedirs(options.trace_dir, mode=0o755, exist_ok=True)
            fd = os.open(options.trace_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            fd = root_fd
            for name in TRACE_DIR:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                # O_NOFOLLOW: a symlink planted in the store cannot redirect our writes.
                new = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
                if fd != root_fd:
                    os.close(fd)
                fd = new
                _check_private(fd, os.fstat(root_fd).st_uid)
    except OSError as exc:
        log.warning("boot traces disabled: cannot use the trace directory %s: %s", where,
                    exc.strerror or exc)
        return None
    log.info("boot traces in %s (host id %s)", where, host)
    return TraceStore(fd, host)


def _check_private(fd: int, store_owner: int) -> None:
    """Refuse a trace directory someone else could write (e.g. made by a user beforehand)."""
    st = os.fstat(fd)
    if st.st_uid not in (os.geteuid(), store_owner) or st.st_mode & 0o022:
        raise OSError(errno.EPERM, f"owned by uid {st.st_uid} with mode "
                      f"{stat.S_IMODE(st.st_mode):o}: only the daemon's user may write it")


def _digests_from_store(chunks: list[int], fd: int, chunk_size: int) -> dict[int, int]:
    """xxh3 of chunks that are not resident, read from the store (blocking)."""
    return {index: xxhash.xxh3_64_intdigest(os.pread(fd, chunk_size, index * chunk_size))
            for index in chunks}


class Boots:
    """Recording, trace keeping and prefetch for the layers of one mount."""

    def __init__(self, store: TraceStore | None, cache: ChunkCache, workers: WorkerPool,
                 options: MountOptions, demand_waiting: Callable[[], int]) -> None:
        self.store = store
        self.cache = cache
        self.workers = workers
        self.options = options
        self.demand_waiting = demand_waiting
        self.nursery: trio.Nursery | None = None
        self._reloading = False

    # ------------------------------------------------------------ attachment
    async def attach(self, layer: Layer) -> None:
        """A layer was just attached to the cache: fingerprint it and load its traces."""
        try:
            if self.store is None:
                layer.trace_status = "off"
                return
            await self._identify(layer)
        finally:
            layer.loaded.set()

    async def _identify(self, layer: Layer) -> bool:
        """Fingerprint the layer and load its traces; False if the store refused the reads.

        The fingerprint is read from the store (in a worker thread) once per attach;
        if that fails (a store error), traces are off for the layer until one of its
        next opens tries again.
        """
        store = self.store
        assert store is not None
        _, ino, size, mtime_ns = layer.identity
        layer.fills += 1  # keeps layer.fd open (and its number ours) while we read it
        try:
            started = time.monotonic()
            fp = await self.workers.run(traces.fingerprint, layer.fd, size)
        except OSError as exc:
            log.warning("boot traces of %s off for now: cannot read it to fingerprint it: "
                        "%s (tried again at its next open)", layer.path, exc.strerror or exc)
            layer.trace_status = "error"
            return False
        finally:
            layer.fills -= 1
            layer.release_fd()
        layer.trace_id = LayerId(fp, size, mtime_ns)
        log.debug("layer %s has fingerprint %s (%.1f ms)", layer.path, fp.hex(),
                  (time.monotonic() - started) * 1000)
        try:
            files, rejected = await self.workers.run(store.load, layer.trace_id, layer.path,
                                                     ino)
        except OSError as exc:  # e.g. the trace directory cannot be listed
            log.warning("cannot read the boot traces of %s: %s", layer.path,
                        exc.strerror or exc)
            files, rejected = [], []
        for name, reason in rejected:
            log.warning("ignoring trace file %s of layer %s: %s", name, layer.path, reason)
        layer.trace_files = files
        self._merge(layer)
        ws = layer.trace
        if ws is not None and ws.converted:
            log.info("boot traces of %s recorded at %s chunks are converted to this mount's "
                     "%d KiB chunks (%d of %d boots)", layer.path,
                     "/".join(f"{cs >> 10} KiB" for cs in ws.chunk_sizes
                              if cs != self.cache.chunk_size),
                     self.cache.chunk_size >> 10, ws.converted, ws.boots)
        record = self.options.record
        current = layer.trace is not None and layer.trace.current
        layer.should_record = record == "on" or (record == "auto" and not current)
        return True

    async def _identify_again(self, layer: Layer) -> None:
        """Retry a failed fingerprint at a later open; prefetch then if it is a first boot."""
        layer.identifying = True
        try:
            if await self._identify(layer) and layer.active and layer.progress is None \
                    and self.options.prefetch != "off":
                self.start_prefetch(layer, "first boot")
        finally:
            layer.identifying = False

    def _merge(self, layer: Layer) -> None:
        if layer.trace_id is None:
            layer.trace = None
            if layer.trace_status != "error":
                layer.trace_status = "off"
            return
        ws = traces.merge(layer.trace_files, layer.trace_id, self.cache.chunk_size)
        layer.trace = ws
        if ws is None:
            layer.trace_status = "none"
        elif ws.current:
            layer.trace_status = "ready"
        elif ws.same_version:
            layer.trace_status = "converted"  # recorded at another chunk size only
        else:
            layer.trace_status = "stale"  # recorded on an older version of the layer

    # -------------------------------------------------------------- prefetch
    def start_prefetch(self, layer: Layer, reason: str) -> bool:
        """Start prefetching a layer's working set unless one is running; True if started."""
        ws = layer.trace
        if ws is None or self.nursery is None or (layer.progress and layer.progress.running):
            return False
        progress = prefetch.Progress(reason, total_bytes=min(ws.bytes, layer.identity[2]))
        layer.progress = progress
        scope = trio.CancelScope()
        layer.prefetch_scope = scope

        async def run() -> None:
            with scope:
                await prefetch.prefetch(self.cache, layer.buffer, ws, progress, path=layer.path,
                                        rate=self.options.prefetch_rate,
                                        demand_waiting=self.demand_waiting)
            progress.running = False
            if progress.stale_chunks and layer.trace_status in ("ready", "converted"):
                log.warning("trace of %s is stale for %d chunks: the layer changed since it "
                            "was recorded; recording the next boot", layer.path,
                            progress.stale_chunks)
                layer.trace_status = "stale"
                if self.options.record != "off":
                    layer.should_record = True
            if layer.handles == 0:
                self.cache.unpin_all(layer.buffer)

        self.nursery.start_soon(run)
        return True

    # ------------------------------------------------------------- sessions
    def opened(self, layer: Layer, handle: object) -> None:
        """A read-only handle of the layer was opened: maybe it is a boot to record."""
        if (layer.trace_status == "error" and not layer.identifying
                and self.nursery is not None):
            self.nursery.start_soon(self._identify_again, layer)
        if layer.handles == 1 and layer.trace is not None and not (
                layer.progress and layer.progress.running):
            self.cache.pin(layer.buffer, layer.trace.chunks)  # a boot set is open again
        session = layer.session
        if layer.should_record and (session is None or (
                session.requests >= MIN_REQUESTS and session.is_scan())):
            # A scan (a cp still running) gives way to a VM that opens the layer.
            layer.session = BootSession(self.cache.chunk_size, layer.identity[2],
                                        window=self.options.boot_window)
            layer.session_owner = handle
            layer.trace_status = "recording"

    def released(self, layer: Layer, handle: object) -> None:
        if layer.session_owner is handle:
            self._finish(layer)
        if layer.handles == 0 and not (layer.progress and layer.progress.running):
            self.cache.unpin_all(layer.buffer)

    async def watch(self, layers: Callable[[], list[Layer]]) -> None:
        """End sessions after the boot window or when their reads go quiet; notice when
        the trace directory changes (a delete or import by scachefs-trace, another host's
        boot, an operator's rm) and read the attached layers' traces again."""
        quiet = min(QUIET_SECONDS, self.options.boot_window)
        stamp = await self._dir_stamp()
        checked = time.monotonic()
        while True:
            await trio.sleep(1)
            now = time.monotonic()
            for layer in layers():
                session = layer.session
                if session is not None and session.over(now, self.options.boot_window, quiet):
                    self._finish(layer)
            if now - checked >= TRACE_DIR_CHECK_SECONDS:
                checked = now
                new = await self._dir_stamp()
                if new is None or new == stamp:
                    continue
                if stamp is not None and self.nursery is not None:
                    if self._reloading:
                        continue  # seen again at the next check
                    self.nursery.start_soon(self.reload, layers())
                stamp = new

    async def _dir_stamp(self) -> tuple[int, ...] | None:
        """What changes when a file of the trace directory is created, renamed or removed."""
        if self.store is None:
            return None
        try:
            st = await self.workers.run(os.fstat, self.store.dir_fd)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, st.st_size)

    async def reload(self, layers: list[Layer]) -> None:
        """Read the layers' traces again (the trace directory changed)."""
        self._reloading = True
        try:
            for layer in layers:
                await self._reload(layer)
        finally:
            self._reloading = False

    async def _reload(self, layer: Layer) -> None:
        store, layer_id = self.store, layer.trace_id
        if store is None or layer_id is None or not layer.active:
            return
        try:
            files, _ = await self.workers.run(store.load, layer_id, layer.path,
                                              layer.identity[1])
        except OSError as exc:
            log.warning("cannot read the boot traces of %s again: %s", layer.path,
                        exc.strerror or exc)
            return
        if layer.trace_id is not layer_id or not layer.active:
            return  # fingerprinted afresh, or dropped, meanwhile
        before, status = layer.trace, layer.trace_status
        layer.trace_files = files
        self._merge(layer)
        ws = layer.trace
        if layer.session is not None:
            layer.trace_status = "recording"
        was_current = before is not None and before.current
        now_current = ws is not None and ws.current
        if was_current != now_current:
            record = self.options.record
            layer.should_record = record == "on" or (record == "auto" and not now_current)
        if (before is None) != (ws is None) or (before is not None and ws is not None and (
                before.boots, before.chunks) != (ws.boots, ws.chunks)):
            log.info("boot traces of %s changed in the trace directory: %s -> %s (%d boots, "
                     "%d chunks)", layer.path, status, layer.trace_status,
                     ws.boots if ws else 0, len(ws.chunks) if ws else 0)
            if layer.progress and layer.progress.running:
                return  # prefetching the old set: what it pins is let go at its end
            if layer.handles:
                self.cache.unpin_all(layer.buffer)  # pin the boot set as it is now
                if ws is not None:
                    self.cache.pin(layer.buffer, ws.chunks)
            elif ws is not None:
                layer.progress = None  # a new prediction: the next boot prefetches it

    def _finish(self, layer: Layer) -> None:
        session = layer.session
        layer.session, layer.session_owner = None, None
        if session is None:
            return
        if not session.is_boot():
            # A scan (sha256sum, cp, a backup) is worth a line: it read the whole layer.
            (log.info if session.is_scan() and session.requests >= MIN_REQUESTS else log.debug)(
                "session on %s not recorded: %s", layer.path, session.why_not_boot())
            self._merge(layer)  # back to what the traces say
            return
        layer.should_record = self.options.record == "on"
        if self.store is not None and self.nursery is not None:
            self.nursery.start_soon(self._save, layer, session)

    async def _save(self, layer: Layer, session: BootSession) -> None:
        store = self.store
        if store is None or layer.fd < 0 or layer.trace_id is None:
            return
        cs = self.cache.chunk_size
        layer_id = layer.trace_id
        # This host's earlier boots of the layer as it is now; boots of another
        # version (the layer changed, or a stale trace) are not carried over. Boots it
        # recorded at another chunk size are converted to this one (their chunks are
        # hashed afresh: they were recorded on these same bytes).
        mine = [f for f in layer.trace_files
                if f.host == store.host and f.layer.same_version(layer_id)]
        kept: list[Boot] = []
        earlier: list[tuple[Boot, list[tuple[int, int]]]] = []  # to convert
        if mine and mine[0].chunk_size == cs:
            kept = mine[0].boots
        elif mine:
            earlier = [(b, traces.regrid(b, mine[0].chunk_size, cs, layer.size))
                       for b in mine[0].boots]
        wanted = dict.fromkeys(session.first_ms)
        for _, chunks in earlier:
            wanted.update(dict.fromkeys(c for c, _ in chunks if c * cs < layer.size))
        # Resident chunks are hashed here, in memory (no copies: an arena chunk is only
        # valid until the next await), a few hundred at a time; the rest in a worker.
        digests: dict[int, int] = {}
        missing: list[int] = []
        for count, index in enumerate(list(wanted)):
            data = self.cache.peek(layer.buffer, index)
            if data is None:
                missing.append(index)
            else:
                digests[index] = xxhash.xxh3_64_intdigest(data)
            if count % 256 == 255:
                await trio.lowlevel.checkpoint()
        try:
            layer.fills += 1  # keeps layer.fd open (and its number ours) until the digests are read
            try:
                digests.update(await self.workers.run(_digests_from_store, missing, layer.fd,
                                                      cs))
            finally:
                layer.fills -= 1
                layer.release_fd()
            boot = Boot(session.started_wall, session.duration_ms, session.requests,
                        session.bytes, [(c, ms, digests[c]) for c, ms in
                                        session.first_ms.items()])
            previous = kept + [Boot(b.started, b.duration_ms, b.requests, b.bytes,
                             [(c, ms, digests[c]) for c, ms in chunks if c in digests])
                        for b, chunks in earlier]
            trace = TraceFile(layer_id, cs, store.host,
                              [*previous, boot][-traces.MAX_BOOTS_PER_FILE:], layer.path)
            name = await self.workers.run(store.save, trace)
        except (OSError, traces.TraceError) as exc:
            log.warning("could not save the boot trace of %s: %s", layer.path, exc)
            self._merge(layer)  # back to what the traces say; auto records the next boot
            current = layer.trace is not None and layer.trace.current
            record = self.options.record
            layer.should_record = record == "on" or (record == "auto" and not current)
            return
        layer.trace_files = [f for f in layer.trace_files if f.host != store.host] + [trace]
        self._merge(layer)
        log.info("recorded a boot of %s: %d reads, %d MiB in %d chunks over %.1f s -> %s",
                 layer.path, session.requests, len(session.first_ms) * cs >> 20,
                 len(session.first_ms), session.duration_ms / 1000, name)

    # ----------------------------------------------------------------- stats
    @staticmethod
    def stats(layer: Layer) -> dict[str, Any]:
        ws = layer.trace
        trace: dict[str, Any] = {"status": layer.trace_status,
                                 "recording": layer.session is not None,
                                 "fingerprint": layer.trace_id.hex if layer.trace_id else None}
        if ws is not None:
            trace.update(boots=ws.boots, hosts=ws.hosts, chunks=len(ws.chunks), bytes=ws.bytes,
                         chunk_sizes=ws.chunk_sizes, converted_boots=ws.converted)
        return {"trace": trace,
                "prefetch": layer.progress.as_dict() if layer.progress else None}
