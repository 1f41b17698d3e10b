"""The serving daemon: one FUSE session over a mounted connection, fresh or taken over.

The holder (:mod:`scachefs.holder`) mounts, keeps /dev/fuse and the state memfd,
and starts this daemon with their descriptors. A daemon on a connection whose
state says INIT already happened restores the tables the kernel relies on
(:mod:`scachefs.takeover`) and asks the kernel to resend what its predecessor
left unanswered, instead of waiting for an INIT that will never come.

SIGTERM unmounts; SIGUSR1 hands over: stop reading requests, let those in hand
finish, and exit with EXIT_HANDOVER so that the holder starts a successor.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable

import trio

from scachefs import crashpoints, state
from scachefs.fs import ScacheFS
from scachefs.fuse import abi
from scachefs.fuse import mount as fuse_mount
from scachefs.fuse.session import Session
from scachefs.keeper import Keeper
from scachefs.options import MountOptions
from scachefs.sdnotify import sd_notify
from scachefs.takeover import Journal, restore

log = logging.getLogger(__name__)

STOP_GRACE = 10.0  # seconds open files may go on after SIGTERM before the connection ends

EXIT_HANDOVER = 75  # stopped serving on request, so that a successor takes over
EXIT_STATE_LOST = 76  # could not take over: the state cannot be trusted
COMPACT_EVERY = 5.0  # seconds between checks whether the state log wants compacting


@dataclasses.dataclass
class Descriptors:
    """What the holder passes: the connection, the store's root, the state, a ready pipe."""

    fuse: int
    root: int
    state: int | None = None
    ready: int | None = None
    arena: int | None = None
    keeper: int | None = None  # the holder keeps copies of open files (keeper.py)


def serve(source: str, mountpoint: str, opts: MountOptions, fds: Descriptors, cause: str,
          ready: Callable[[], None]) -> int:
    """Serve until unmounted (0) or asked to hand over (EXIT_HANDOVER)."""
    os.umask(0)  # the daemon's own files; callers' creates apply their umask per thread (creds)
    ops = ScacheFS(fds.root, opts, source, mountpoint, arena_fd=fds.arena)
    session = Session(fds.fuse, ops, max_tasks=opts.max_tasks)
    ops.session = session
    resume: tuple[int, int] | None = None
    kept: dict[int, int] = {}
    if fds.keeper is not None:
        ops.keeper = Keeper(fds.keeper)
        kept = ops.keeper.received()
    if fds.state is not None:
        statelog = state.StateLog(fds.state)
        if statelog.initialized():
            started = time.monotonic()
            try:
                snap = statelog.load()
            except state.StateError as exc:
                log.error("cannot take over the mount: its state is corrupt (%s)", exc)
                return EXIT_STATE_LOST
            done = restore(ops, snap, kept)
            ops.restored()  # the writers among the open files: their layers stay uncached
            ops.generation = statelog.begin_generation(cause, time.time_ns())
            crashpoints.arm(ops.generation)
            ops.restart = {"generation": ops.generation, "cause": cause,
                           "time": time.time(), "restored_nodes": done.nodes,
                           "restored_files": done.files, "lost_nodes": done.lost_nodes,
                           "lost_files": done.lost_files}
            ops.restored_layer_files = done.layer_files
            resume = (snap.proto_minor, snap.flags)
            log.info("generation %d (%s): restored %d nodes, %d open files, %d directories "
                     "in %.3f s%s", ops.generation, cause, done.nodes, done.files, done.dirs,
                     time.monotonic() - started,
                     f"; lost {done.lost_nodes} nodes and {done.lost_files} files (gone "
                     "from the store)" if done.lost_nodes or done.lost_files else "")
        else:
            def initialized(minor: int, flags: int) -> None:
                statelog.start(minor, flags, bool(flags & abi.PASSTHROUGH))

            session.on_init = initialized
            crashpoints.arm(0)
        ops.use_journal(Journal(statelog))
        ops.holder_pid = os.getppid()
    for fd in kept.values():  # files the state does not know (any more): not ours
        os.close(fd)
    kept.clear()
    log.info("serving %s on %s (cache budget %d MiB, %d open files at most)", source,
             mountpoint, opts.cache_budget() >> 20, ops.fd_limit)
    return trio.run(_serve, ops, session, mountpoint, ready, resume)


async def _serve(ops: ScacheFS, session: Session, mountpoint: str,
                 ready: Callable[[], None], resume: tuple[int, int] | None) -> int:
    handed_over = False
    async with trio.open_nursery() as nursery:

        async def wait_ready() -> None:
            # The mount is live once a request through it is answered by our loop.
            await trio.to_thread.run_sync(os.stat, mountpoint)
            ready()

        async def on_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
            nonlocal handed_over
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                           signal.SIGUSR1) as signals:
                task_status.started()  # the holder may send SIGUSR1 once we said ready
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        log.info("handing over to a successor: finishing the requests "
                                 "in hand")
                        handed_over = True
                        session.handover()
                        return
                    log.info("received %s, unmounting", signal.Signals(signum).name)
                    sd_notify("STOPPING=1")
                    # Lazily: the kernel ends the connection (our loop sees it) once no
                    # file under the mount is open any more ...
                    await trio.to_thread.run_sync(fuse_mount.unmount, mountpoint, session.fd)
                    # ... unless files stay open, or another mount namespace holds a copy
                    # of the mount: then we end it, so a stop always ends (they get
                    # ENOTCONN once our holder closes the last /dev/fuse descriptor).
                    await trio.sleep(STOP_GRACE)
                    log.warning("the mount is still in use %.0f s after %s (open files, or "
                                "a copy in another mount namespace): ending the connection; "
                                "its users get ENOTCONN", STOP_GRACE,
                                signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

        async def compact() -> None:
            while ops.journal is not None:
                await trio.sleep(COMPACT_EVERY)
                ops.journal.compact_if_needed(ops)

        await nursery.start(on_signals)
        if resume is None:
            nursery.start_soon(wait_ready)
        else:
            ready()
        nursery.start_soon(compact)
        await ops.background(nursery)
        await session.serve(resume)
        nursery.cancel_scope.cancel()
    # The state log is consistent at every instant: nothing to write on the way out.
    return EXIT_HANDOVER if handed_over else 0
