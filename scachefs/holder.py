"""The holder: keeps the mount alive across the serving daemon's deaths and upgrades.

A FUSE connection lives as long as any descriptor of its /dev/fuse is open. The
holder is the process ``scachefs`` starts: it mounts, keeps the /dev/fuse
descriptor, the store's root descriptor and the state memfd, and runs the
serving daemon (:mod:`scachefs.daemon`) as its child with copies of them.

- The daemon dies (a crash, an OOM kill, SIGKILL): the connection stays up,
  requests wait in the kernel, and the holder starts a successor at once, which
  restores the tables from the state and asks the kernel to resend what its
  predecessor left unanswered. VMs see a stall, not an error.
- SIGHUP (``systemctl reload``, ``scachefs-stat --upgrade``): graceful upgrade.
  The holder starts the new code installed on disk as a standby, which loads and
  waits; then the daemon stops reading requests, answers those in hand and exits,
  and the standby takes over.
- SIGTERM/SIGINT: the daemon unmounts and exits; so does the holder. Except when
  systemd sends SIGTERM to restart the unit (`systemctl restart`: its job says so):
  then the daemon hands over, and the holder exits leaving the mount and its
  descriptors in systemd's fd store, from which the next holder takes it over.
- Where a takeover cannot work (a kernel without FUSE_NOTIFY_RESEND, state that
  cannot be trusted, ``restart=off``, a daemon that keeps crashing) the holder
  falls back to what happens without it: it lets the connection go, so clients
  get ENOTCONN instead of waiting forever, and says so in the log.

The holder imports little and does little, so that it has no reason to die. If
it is killed, the daemon serves on with its own copy of the connection; the
mount then lives until that daemon ends, and goes away cleanly (ENOTCONN) then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from scachefs import arena, keeper, state
from scachefs.fuse import abi
from scachefs.fuse import mount as fuse_mount
from scachefs.sdnotify import restart_pending, sd_notify

log = logging.getLogger(__name__)

CRASH_WINDOW = 60.0  # seconds: more than CRASH_LIMIT restarts in this window ...
CRASH_LIMIT = 10  # ... means the daemon cannot run here: give up
RESTART_CAUSE_ENV = "SCACHEFS_RESTART_CAUSE"
STANDBY_ENV = "SCACHEFS_STANDBY_FD"  # an upgrade's successor waits on this socket
STANDBY_TIMEOUT = 30.0  # seconds a standby may take to load its code


def describe(returncode: int) -> str:
    """How a daemon ended, for the log and the stats."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


FDSTORE_NAMES = ("scachefs-fuse", "scachefs-root", "scachefs-state", "scachefs-arena")


def stored_fds() -> dict[str, int] | None:
    """The descriptors systemd's fd store gave back to a restarted holder (LISTEN_FDS).

    None unless all four are there (then the mount lives on: take it over). A partial
    set is of no use (a connection without its state cannot be taken over): it is closed
    and removed from the fd store (FDSTOREREMOVE), never left there; so are extra copies.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    given = {3 + i: (names[i] if i < len(names) else "") for i in range(count)}
    found: dict[str, int] = {}
    for fd, name in given.items():
        if name in FDSTORE_NAMES:
            found[name] = fd  # the last of each name: the newest
    keep = set(found.values()) if set(found) == set(FDSTORE_NAMES) else set()
    extra = [fd for fd in given if fd not in keep]
    if extra:
        if keep:
            log.warning("systemd's fd store held %d descriptors more than the mount's four: "
                        "dropping them", len(extra))
        else:
            log.warning("systemd's fd store gave back %s, not the mount's four descriptors: "
                        "a partial set cannot be taken over; releasing it",
                        ", ".join(sorted(set(given.values()))) or "nothing named")
        for fd in extra:
            with contextlib.suppress(OSError):
                os.close(fd)
        # Removal goes by name (all copies); the holder stores the kept ones again.
        for name in sorted({given[fd] for fd in extra if given[fd]}):
            sd_notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
    return found if keep else None


class Holder:
    """Mounts, runs the daemon, restarts it, hands over on upgrade."""

    def __init__(self, spec: fuse_mount.MountSpec, root_fd: int, daemon_args: list[str],
                 restart: bool, cache: tuple[int, int]) -> None:
        self.spec = spec
        self.root_fd = root_fd
        self.daemon_args = daemon_args
        self.restart = restart
        self.cache = cache  # (chunk size, budget) of the arena the daemons share
        self.fuse_fd = -1
        self.arena_fd = -1
        self.state_fd = -1
        self._stop: int | None = None  # SIGTERM or SIGINT received
        self._upgrade = False  # SIGHUP received, not yet passed on
        self._handing_over = False  # an upgrade passed on, its successor not ready yet
        self._ready_seen = False  # a daemon said the mount is live
        self._daemon_ready = False  # the current daemon serves and handles SIGUSR1
        self._crashes: list[float] = []
        self._keep = False  # systemd restarts the unit: leave the mount to the next holder
        # An upgrade's successor, loaded and waiting for the daemon to hand over:
        # (process, ready pipe, keeper end, its go socket).
        self._standby: tuple[subprocess.Popen[bytes], int, socket.socket,
                             socket.socket] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.kept = keeper.Kept()  # copies of the daemons' open files (see keeper.py)

    # -------------------------------------------------------------- running
    def run(self, ready: Callable[[], None], stored: dict[str, int] | None = None) -> int:
        """Mount (or, with ``stored``, take over the mount systemd kept for us) and keep
        it served until it is unmounted; the exit status."""
        if stored is not None:
            self.fuse_fd, self.root_fd, self.state_fd, self.arena_fd = (
                stored[name] for name in FDSTORE_NAMES)
            cause = "holder restart"
            log.info("took the mount back from systemd's fd store")
        else:
            self.fuse_fd = fuse_mount.mount(self.spec)
            self.state_fd = state.create_memfd("scachefs-state")
            self.arena_fd = arena.create_memfd(*self.cache)
            cause = "mount"
        for fd in (self.fuse_fd, self.root_fd, self.state_fd, self.arena_fd):
            os.set_inheritable(fd, True)
        # Under systemd, the fd store keeps the connection if this holder dies too.
        for name, fd in zip(FDSTORE_NAMES, (self.fuse_fd, self.root_fd, self.state_fd,
                                            self.arena_fd), strict=True):
            sd_notify(f"FDSTORE=1\nFDNAME={name}", fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        first = True
        code = 0
        try:
            while True:
                returncode = self._run_daemon(cause, ready if first else None)
                if first and not self._ready_seen:
                    raise OSError(0, f"the daemon {describe(returncode)} before the mount "
                                     "was live (its log says why)")
                first = False
                # Imported now, not at start-up: the daemon is running meanwhile.
                from scachefs.daemon import EXIT_HANDOVER
                if returncode == 0 or not fuse_mount.connection_alive(self.fuse_fd):
                    break  # unmounted
                if self._stop is not None:
                    break  # told to stop, and the daemon died on the way: let go
                if returncode == EXIT_HANDOVER:
                    cause = "upgrade"
                    log.info("upgrade: starting the new daemon")
                    continue
                reason = self._why_not_restart(returncode)
                if reason is not None:
                    log.error("the daemon %s and cannot be restarted (%s): letting the "
                              "mount go; clients get ENOTCONN until it is mounted again",
                              describe(returncode), reason)
                    code = 1
                    break
                cause = f"crashed: {describe(returncode)}"
                log.warning("the daemon %s; starting a successor that takes over the mount",
                            describe(returncode))
        finally:
            if self._standby is not None:
                self._drop_standby(self._standby)
                self._standby = None
            if self._keep and fuse_mount.connection_alive(self.fuse_fd):
                log.info("left %s mounted for the next holder", self.spec.mountpoint)
            else:
                self._keep = False
                fuse_mount.unmount(self.spec.mountpoint, self.fuse_fd)
            os.close(self.fuse_fd)
            os.close(self.state_fd)
            os.close(self.arena_fd)
            self.kept.close()
            if not self._keep:
                for name in FDSTORE_NAMES:
                    sd_notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
                log.info("unmounted %s", self.spec.mountpoint)
        return code

    def _why_not_restart(self, returncode: int) -> str | None:
        """None if a successor can take over the connection, else why not."""
        from scachefs.daemon import EXIT_STATE_LOST
        if not self.restart:
            return "restart=off"
        if returncode == EXIT_STATE_LOST:
            return "its state is corrupt"
        log_ = state.StateLog(self.state_fd)
        try:
            if not log_.initialized():
                return "it died before the kernel's INIT was answered"
            flags = log_.load().flags
        except state.StateError as exc:
            return f"its state cannot be read: {exc}"
        finally:
            log_.close()
        if not flags & abi.HAS_RESEND:
            return ("the kernel cannot resend the requests it held (FUSE_NOTIFY_RESEND "
                    "needs Linux 6.9 or newer)")
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW] + [now]
        if len(self._crashes) > CRASH_LIMIT:
            return f"it crashed {len(self._crashes)} times within {CRASH_WINDOW:.0f} s"
        return None

    def _spawn(self, cause: str, go: socket.socket | None = None
               ) -> tuple[subprocess.Popen[bytes], int, socket.socket]:
        """Start a daemon on our descriptors: (process, its ready pipe, our keeper end).

        With ``go``, a standby: it loads its code, says so (b"l") and waits for b"g"
        before it touches the connection or the state.
        """
        read_end, write_end = os.pipe()
        ours, theirs = keeper.pair()
        fds = (self.fuse_fd, self.root_fd, self.state_fd, write_end, self.arena_fd,
               theirs.fileno())
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env[RESTART_CAUSE_ENV] = cause
        pass_fds: tuple[int, ...] = fds
        if go is not None:
            env[STANDBY_ENV] = str(go.fileno())
            pass_fds = (*fds, go.fileno())
        argv = [sys.executable, "-m", "scachefs", "--serve-fds",
                ",".join(str(fd) for fd in fds), *self.daemon_args]
        # /proc/self/exe: our own interpreter, even where its path is not reachable for
        # the user we run as (argv[0] still names the venv's python, for its packages).
        proc = subprocess.Popen(argv, executable="/proc/self/exe", pass_fds=pass_fds,
                                env=env, stdin=subprocess.DEVNULL)
        os.close(write_end)
        theirs.close()
        return proc, read_end, ours

    def _prepare_upgrade(self) -> None:
        """Start the successor of an upgrade before the daemon stops serving, and wait
        until it has loaded the code installed now (imports take most of a daemon's
        start): the stall is then the handover and the takeover, not a Python start."""
        ours, theirs = socket.socketpair()
        standby = self._spawn("upgrade", theirs)
        theirs.close()
        ours.settimeout(STANDBY_TIMEOUT)
        try:
            loaded = ours.recv(1) == b"l"
        except OSError:
            loaded = False
        if loaded:
            ours.settimeout(None)
            self._standby = (*standby, ours)
            return
        log.warning("the new daemon did not load within %.0f s: upgrading without a standby",
                    STANDBY_TIMEOUT)
        self._drop_standby((*standby, ours))

    @staticmethod
    def _drop_standby(standby: tuple[subprocess.Popen[bytes], int, socket.socket,
                                     socket.socket]) -> None:
        proc, read_end, keeper_end, go = standby
        go.close()  # a standby that reads EOF instead of b"g" exits
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(read_end)
        keeper_end.close()

    def _run_daemon(self, cause: str, ready: Callable[[], None] | None) -> int:
        """Start a daemon on our descriptors (or let the upgrade's standby go) and wait
        for it to end; its return code."""
        self._daemon_ready = False
        if self._standby is not None:
            self.proc, read_end, ours, go = self._standby
            self._standby = None
            log.info("the new daemon, loaded beforehand, takes over")
            try:
                go.sendall(b"g")
            except OSError:
                pass  # it died: its return code says so below
            go.close()
        else:
            self.proc, read_end, ours = self._spawn(cause)
        threading.Thread(target=self.kept.serve, args=(ours,), daemon=True,
                         name="keeper").start()
        waiter = threading.Thread(target=self._wait_ready, args=(read_end, ready),
                                  daemon=True, name="ready")
        waiter.start()
        forwarded = False
        while True:
            try:
                returncode = self.proc.wait(timeout=0.2)
                waiter.join(5)  # the pipe closed with the daemon: its news is in
                return returncode
            except subprocess.TimeoutExpired:
                pass
            # SIGUSR1 before the daemon handles it would kill it: wait until it says so.
            if self._upgrade and self._daemon_ready and self._stop is None:
                self._upgrade = False
                self._handing_over = True
                self._prepare_upgrade()
                log.info("upgrade requested: the daemon hands over")
                self.proc.send_signal(signal.SIGUSR1)
            if self._stop is not None and not forwarded:
                forwarded = True
                if self._stop == signal.SIGTERM and restart_pending():
                    # `systemctl restart`: the next holder takes the mount over from the
                    # fd store, so open files keep working (a stall, not an unmount).
                    self._keep = True
                    log.info("systemd restarts the unit: leaving the mount to the next "
                             "holder (fd store)")
                    if self._daemon_ready:
                        self.proc.send_signal(signal.SIGUSR1)  # finish what is in hand
                    else:
                        self.proc.kill()
                else:
                    sd_notify("STOPPING=1")
                    self.proc.send_signal(signal.SIGTERM)

    def _wait_ready(self, fd: int, ready: Callable[[], None] | None) -> None:
        with os.fdopen(fd, "rb") as pipe:
            if pipe.read(1) == b"r":
                self._ready_seen = True
                self._daemon_ready = True
                self._handing_over = False
                if ready is not None:
                    ready()
                    sd_notify("READY=1")

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            # Requests that arrive while an upgrade is under way are merged into it: its
            # successor runs the code installed now.
            if not self._handing_over:
                self._upgrade = True
        else:
            self._stop = signum
