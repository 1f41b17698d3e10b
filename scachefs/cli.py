"""The ``scachefs`` command: parse arguments, mount, serve until unmounted or signalled.

Without ``-f`` the command forks and returns only once the mount answers
requests, with a non-zero exit and the reason when it does not, so that mount(8),
systemd and scripts can rely on the mount being live when it returns.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import logging.handlers
import os
import re
import resource
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from scachefs import __version__
from scachefs.fuse import mount as fuse_mount
from scachefs.holder import RESTART_CAUSE_ENV, STANDBY_ENV, Holder, stored_fds
from scachefs.options import MountOptions, OptionError, parse_options, split_option_string
from scachefs.sdnotify import sd_notify

if TYPE_CHECKING:
    from scachefs import daemon
# scachefs.daemon (trio and the whole file system: 0.3 s of imports) is imported where a
# daemon runs, not in the holder: a takeover waits for the holder's start-up.

log = logging.getLogger("scachefs")

OPTIONS_HELP = """\
mount options (-o name[=value],...):
  allow_other          let users other than the mounting one use the mount; the kernel
                       still checks every access against the store's owners and modes
                       (default_permissions is always on)
  ro                   mount read-only (also applied: nodev, nosuid, noexec, noatime,
                       nodiratime, relatime, strictatime, sync, dirsync, nosymfollow
                       and their opposites)
  cache_size=SIZE      memory budget of the shared layer cache, e.g. 512M, 2G, 10%
                       (of RAM); default: 25% of RAM; at least 16 chunks
  chunk_size=SIZE      cache chunk size, a power of two from 4K to 1M (default 16K)
  readahead=SIZE       a read that misses fetches at least this aligned window from the
                       store (default 64K; 0 = just the chunks asked for)
  attr_timeout=SEC     how long the kernel may cache attributes (default 10)
  entry_timeout=SEC    how long the kernel may cache name lookups (default 10)
  threads=N            worker threads for store I/O (default 16)
  log_file=PATH        log to this file (default: stderr in the foreground, the journal
                       under systemd, syslog once detached)
  record=auto|on|off   record boot traces: auto (default) for layers without a current
                       trace, on for every boot, off never
  boot_window=SEC      a boot session ends this long after it started (default 120), at
                       the VM's close, or after 30 s without reads
  prefetch=open|mount|off
                       prefetch a layer's recorded working set at its first boot (open,
                       the default), also as soon as the mount starts (mount), or never
  prefetch_rate=SIZE   cap prefetch bandwidth, e.g. 100M (per second; default unlimited)
  trace_dir=PATH       where traces live (default SOURCE/.scache/traces, shared by every
                       host that mounts the same store)
  host_id=NAME         this host's name in trace file names (default: the host name)
  max_tasks=N          FUSE requests served concurrently (default 128)
  passthrough=auto|on|off
                       let the kernel read and write every file that is not a shared
                       layer itself (FUSE passthrough, Linux 6.9+, daemon as root): auto
                       (default) where possible, on: refuse to mount without it, off: the
                       daemon serves every read and write
  restart=on|off       on (default): a small holder process keeps the mount and restarts
                       the daemon when it dies; the new daemon takes the mount over and
                       VMs see a stall, not an error (SIGHUP to the holder, or
                       scachefs-stat --upgrade, upgrades the daemon the same way); off:
                       one process, and the mount dies with it
  layers=auto|all      which files are served from the shared cache: auto (default) the
                       files other images name as backing file; all: every file opened
                       read-only (for a mount over a base directory only, e.g. Nova's
                       instances/_base)
  require_mount        refuse to start unless SOURCE is a mount point or lies below one
                       other than / (a store that is not mounted yet is never served or
                       written into; e.g. an NFS export mounted later in boot)
  remount              (mount -o remount, systemctl reload of a .mount unit) upgrade the
                       running daemon to the code installed now and apply ro/rw, noexec,
                       nosuid, nodev, noatime...; other options cannot change on a live
                       mount: they are refused with their names
  defaults, auto, noauto, nofail, _netdev, _rnetdev, user, users, owner, group,
  lazytime, iversion, mand, silent (and their no* forms), x-*, X-*, comment=*
                       fstab, systemd and disk file system options: accepted and
                       ignored (SELinux context= options are refused)

examples:
  scachefs /srv/images /var/lib/scache -o allow_other,cache_size=2G
  scachefs /srv/images /srv/images        # mount over the store itself
  fusermount3 -u /var/lib/scache          # or: umount /var/lib/scache (root)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scachefs",
        description="Re-export an image directory (base images and qcow2 overlays) through "
        "FUSE and serve every backing layer from one shared in-memory cache, so that "
        "many VMs booting at once read each shared base block from the store once.",
        epilog=OPTIONS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="the image store directory")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT",
                        help="where to mount (may be SOURCE itself)")
    parser.add_argument("-o", dest="options", action="append", default=[],
                        metavar="OPT[,OPT...]", help="mount options, see below")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground and log to stderr")
    parser.add_argument("--debug", action="store_true",
                        help="log every request (implies verbose logging)")
    parser.add_argument("--version", action="version", version=f"scachefs {__version__}")
    # Internal: the holder starts the serving daemon with its descriptors (FUSE, root,
    # state, ready pipe).
    parser.add_argument("--serve-fds", help=argparse.SUPPRESS)
    return parser


def setup_logging(debug: bool, to_syslog: bool = False, log_file: str | None = None) -> None:
    """Log to stderr (and so to the journal under systemd), a file, or syslog when detached."""
    handler: logging.Handler
    if log_file:
        handler = logging.handlers.WatchedFileHandler(log_file)  # logrotate-friendly
        handler.setFormatter(logging.Formatter(
            "%(asctime)s scachefs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    elif to_syslog and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("scachefs[%(process)d]: %(levelname)s "
                                               "%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s scachefs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


class _HeldLogs(logging.Handler):
    """A background mount's log records, held until the mount is live.

    A successful mount says nothing on the caller's terminal (mount(8), fstab and
    scripts treat output on stderr as failure): once live, the records go where the
    detached daemon logs. A mount that fails shows its warnings and errors on the
    terminal after all, with the reason.
    """

    def __init__(self, terminal: logging.Handler) -> None:
        super().__init__()
        self.terminal = terminal
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 10_000:  # --debug before the mount is live: keep the start
            self.records.append(record)

    def pass_on(self, to: logging.Handler | None, level: int = logging.NOTSET) -> None:
        """Pass the records held to ``to`` (None: drop them), from ``level`` up."""
        records, self.records = self.records, []
        for record in records:
            if to is not None and record.levelno >= level:
                to.handle(record)

    def close(self) -> None:
        # Records still held at exit: the mount never went live. Show what went wrong.
        self.pass_on(self.terminal, logging.WARNING)
        super().close()


def _hold_logs() -> None:
    """Hold the records of a background mount until it is live (see _HeldLogs)."""
    root = logging.getLogger()
    if _stderr_is_journal() or not any(
            isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr
            for h in root.handlers):
        return  # the journal, or a log_file: nothing reaches the caller's terminal
    root.handlers[:] = [_HeldLogs(root.handlers[0])]


def _release_logs_to_terminal() -> None:
    """The mount failed: the held warnings and errors go to the terminal after all."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _HeldLogs):
            handler.pass_on(handler.terminal, logging.WARNING)


class MountError(Exception):
    """The mount could not be made; the message says why and what to do."""


def _unescape(field: str) -> str:
    """A path from /proc/self/mountinfo (spaces and the like are octal escapes)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, source) of every mount, in mount order, from mountinfo."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            fields = line.split()
            sep = fields.index("-")
            found.append((_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])))
    return found


def _resolved(path: str) -> str:
    """path with its parent's symlinks resolved, never looking at path itself (a FUSE
    mount there may be one nobody serves: a stat would wait for good)."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(parent), name) if name else parent


def fuse_mount_at(mountpoint: str) -> str | None:
    """The fstype of the topmost mount exactly at mountpoint if it is a FUSE mount."""
    target = _resolved(mountpoint)
    found = None
    for point, fstype, _ in mounts():
        if point == target:
            found = fstype if fstype.split(".")[0] in ("fuse", "fuseblk") else None
    return found


PROBE_TIMEOUT = 2.0  # seconds a FUSE mount already there gets to answer a statfs


def probe(mountpoint: str, timeout: float = PROBE_TIMEOUT) -> str:
    """"served", "dead" (ENOTCONN) or "unserved" (no answer): asked by a child process.

    statfs always reaches the daemon (attributes may be cached, a statfs never is). The
    request of a connection nobody serves waits killably in the kernel: the child is
    killed, never this process.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.statvfs(mountpoint)
            os._exit(0)
        except OSError as exc:
            os._exit(2 if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED) else 3)
        except BaseException:
            os._exit(3)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return {0: "served", 2: "dead"}.get(code, "error")
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "unserved"
        time.sleep(0.01)


def _clear_mountpoint(mountpoint: str) -> None:
    """Deal with a FUSE mount already at mountpoint without ever waiting on it.

    A dead scachefs mount (its daemon and holder gone) or one nobody serves (the
    descriptors of a holder that died, not taken over) is detached lazily, so a new
    mount can take its place; a live scachefs mount is an error (mount it once).
    """
    fstype = fuse_mount_at(mountpoint)
    if fstype is None:
        return
    state = probe(mountpoint)
    if state == "served":
        if fstype == "fuse.scachefs":
            raise MountError(f"MOUNTPOINT {mountpoint} already has a live scachefs mount "
                             "(unmount it first: umount -l)")
        return  # another file system's live mount (e.g. the store itself): mount over it
    if fstype != "fuse.scachefs":
        raise MountError(f"MOUNTPOINT {mountpoint} has a {fstype} mount that does not answer "
                         f"({state}): unmount it first (umount -l)")
    log.warning("%s is a %s scachefs mount (its daemon is gone): detaching it lazily; "
                "files still open on it get ENOTCONN", mountpoint,
                "dead" if state == "dead" else "stale, unserved")
    fuse_mount.unmount(mountpoint)


def check_store_mounted(source: str) -> None:
    """require_mount: SOURCE must be a mount point or lie below one other than /."""
    target = os.path.realpath(source)
    best = "/"
    for point, _, _ in mounts():
        if (target == point or target.startswith(point.rstrip("/") + "/")) \
                and len(point) > len(best):
            best = point
    if best == "/":
        raise MountError(f"SOURCE {source} is not on a mounted file system of its own (it is "
                         "on the root file system): the store is not mounted (yet); "
                         "refusing to serve it (require_mount)")


def open_root(source: str) -> int:
    """The store's root directory, O_RDONLY: systemd's fd store refuses O_PATH descriptors
    (it polls what it stores), and the holder keeps this one there."""
    try:
        return os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:  # searchable but not readable: fine outside the fd store
        return os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _check_dirs(source: str, mountpoint: str, require_mount: bool = False) -> int:
    """Open SOURCE before mounting (it may be hidden by the mount) and check MOUNTPOINT."""
    _clear_mountpoint(mountpoint)
    if require_mount:
        check_store_mounted(source)
    try:
        root_fd = open_root(source)
    except OSError as exc:
        raise MountError(f"cannot open SOURCE {source}: {exc.strerror}") from None
    try:
        st = os.stat(mountpoint)
    except OSError as exc:
        os.close(root_fd)
        raise MountError(f"cannot use MOUNTPOINT {mountpoint}: {exc.strerror} "
                         "(create it with mkdir -p)") from None
    if not stat.S_ISDIR(st.st_mode):
        os.close(root_fd)
        raise MountError(f"MOUNTPOINT {mountpoint} is not a directory")
    return root_fd


def _first(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc`` or, for a group, among its members."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for member in exc.exceptions:
            found = _first(member, kind)
            if found is not None:
                return found
    return None


def raise_fd_limit() -> int:
    """Raise the soft limit of open files to the hard limit (as passthrough_hp does).

    The daemon holds one descriptor per file the kernel knows (an ``ls -l`` of a big
    directory is thousands); the usual soft limit of 1024 is far too low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    if soft < 65536:
        log.warning("the open-file limit is %d: the daemon needs one descriptor per file "
                    "the kernel holds; raise it (LimitNOFILE= in the systemd unit, ulimit -n)",
                    soft)
    return soft


def run_mount(source: str, mountpoint: str, opts: MountOptions, debug: bool,
              ready: Callable[[], None], daemon_args: list[str]) -> int:
    """Mount and serve until unmounted or signalled; the exit status. Raises MountError."""
    raise_fd_limit()
    spec = fuse_mount.MountSpec(source, mountpoint, "scachefs", allow_other=opts.allow_other,
                                flags=opts.kernel_flags)
    stored = stored_fds() if opts.restart == "on" else None
    if stored is not None:  # systemd kept the live mount: no new mount, no look at it
        holder = Holder(spec, stored["scachefs-root"], daemon_args, restart=True,
                        cache=(opts.chunk_size, opts.cache_budget()))
        return holder.run(ready, stored)
    root_fd = _check_dirs(source, mountpoint, opts.require_mount)
    os.set_inheritable(root_fd, True)
    try:
        if opts.restart == "on":
            return Holder(spec, root_fd, daemon_args, restart=True,
                          cache=(opts.chunk_size, opts.cache_budget())).run(ready)
        fd = fuse_mount.mount(spec)
    except OSError as exc:
        raise MountError(f"mounting {source} on {mountpoint} failed: {exc.strerror or exc}"
                         ) from None

    def ready_single() -> None:
        ready()
        sd_notify("READY=1")  # under systemd (Type=notify), as the holder does

    # Without a holder there is nobody to upgrade to: SIGHUP (systemctl reload) must not
    # kill the mount, as its default action would.
    signal.signal(signal.SIGHUP, _sighup_without_holder)
    from scachefs import daemon
    try:
        return _serve_daemon(source, mountpoint, opts,
                             daemon.Descriptors(fd, root_fd), "mount", ready_single)
    finally:
        fuse_mount.unmount(mountpoint, fd)
        os.close(fd)
        log.info("unmounted %s", mountpoint)


def _sighup_without_holder(signum: int, frame: object) -> None:
    log.warning("SIGHUP (reload/upgrade) ignored: with restart=off there is no holder to "
                "hand the mount over to; mount with restart=on to upgrade without a stop")


def _serve_daemon(source: str, mountpoint: str, opts: MountOptions, fds: daemon.Descriptors,
                  cause: str, ready: Callable[[], None]) -> int:
    from scachefs import daemon
    try:
        return daemon.serve(source, mountpoint, opts, fds, cause, ready)
    except BaseException as exc:
        refused = _first(exc, ConnectionError)
        if refused is not None:
            raise MountError(f"mounting {source} on {mountpoint} failed: {refused}") from None
        raise


def serve_with_fds(source: str, mountpoint: str, opts: MountOptions, spec: str,
                   detach: bool) -> int:
    """The daemon process a holder started: serve on the descriptors it passed.

    ``detach``: the holder runs in the background; once the mount is live this
    process lets go of the terminal too (until then, errors still reach the user).
    """
    values = [int(v) for v in spec.split(",")]
    fuse_fd, root_fd, state_fd, ready_fd, arena_fd = values[:5]
    keeper_fd = values[5] if len(values) > 5 else None  # a holder older than the keeper
    for fd in (fuse_fd, root_fd, state_fd, arena_fd, keeper_fd):
        if fd is not None:
            os.set_inheritable(fd, False)
    # The open-file limit is the holder's, raised (and warned about) once there.

    def ready() -> None:
        if detach:
            _detach_output()
        try:
            os.write(ready_fd, b"r")
            os.close(ready_fd)
        except OSError:
            pass

    cause = os.environ.get(RESTART_CAUSE_ENV, "mount")
    from scachefs import daemon
    standby = os.environ.pop(STANDBY_ENV, None)
    if standby is not None:  # an upgrade's successor: loaded; wait until it is our turn
        with socket.socket(fileno=int(standby)) as go:
            try:
                go.sendall(b"l")
                if go.recv(1) != b"g":
                    return 0  # the upgrade was called off
            except OSError:
                return 0
    try:
        code = _serve_daemon(source, mountpoint, opts,
                             daemon.Descriptors(fuse_fd, root_fd, state_fd, ready_fd,
                                                arena_fd, keeper_fd),
                             cause, ready)
    except MountError as exc:
        log.error("%s", exc)
        return 1
    if code == daemon.EXIT_HANDOVER:
        # The successor waits for this process to end, and VMs wait for the successor:
        # skip the interpreter's teardown. Nothing is left to write (the state is
        # consistent at every instant; every request in hand was answered).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


_DETACHED_ENV = "SCACHEFS_DETACHED"


def _daemonize(run: Callable[[Callable[[], None]], int]) -> int:
    """Fork; the parent returns 0 once the child reports the mount live, else 1."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, _HeldLogs):
                handler.pass_on(None)  # the child shows or keeps them; never both of us
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message.startswith("ok"):
            return 0
        _, status = os.waitpid(pid, 0)
        print(message.strip() or f"scachefs: daemon exited (status {status}) before the "
              "mount was live; run with -f to see why", file=sys.stderr)
        return 1
    os.close(read_fd)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    reported = False

    def ready() -> None:
        nonlocal reported
        _detach_output()
        os.write(write_fd, b"ok\n")
        os.close(write_fd)
        reported = True

    code = 0
    try:
        code = run(ready)
    except MountError as exc:
        log.error("%s", exc)
        _release_logs_to_terminal()
        os.write(write_fd, f"scachefs: {exc}\n".encode())
        code = 1
    except BaseException:
        log.exception("daemon failed")
        code = 1
    finally:
        if not reported:
            _release_logs_to_terminal()
            with contextlib.suppress(OSError):
                os.close(write_fd)
    os._exit(code)


def _stderr_is_journal() -> bool:
    """True when stderr is systemd's journal stream (then it stays the log)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


_LOG_NAME = ["scachefs"]  # the mount point, for the name of a fallback log file


def _fallback_log_file() -> str:
    """Where a detached mount logs when there is no syslog, journal or log_file."""
    name = _LOG_NAME[0].strip("/").replace("/", "-") or "root"
    if os.geteuid() == 0:
        return f"/var/log/scachefs/{name}.log"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/scachefs-{os.geteuid()}"
    return os.path.join(base, "scachefs", f"{name}.log")


def _detach_output() -> None:
    """Let go of the caller's stdout/stderr once mounted, so `$(scachefs ...)` returns.

    Logs then go to the journal (stderr under systemd), a log_file if one was given,
    syslog (/dev/log), or else a file named after the mount point, said once on the
    caller's terminal (see _fallback_log_file).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    root = logging.getLogger()
    held = [h for h in root.handlers if isinstance(h, _HeldLogs)]
    if not _stderr_is_journal():
        if held or any(isinstance(h, logging.StreamHandler)
                       and getattr(h, "stream", None) is sys.stderr for h in root.handlers):
            if os.path.exists("/dev/log"):
                setup_logging(root.level == logging.DEBUG, to_syslog=True)
            else:  # no journal, no syslog (containers): a file, and say once where
                path = _fallback_log_file()
                try:
                    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                    setup_logging(root.level == logging.DEBUG, log_file=path)
                    where = path
                except OSError as exc:
                    where = f"nowhere ({path}: {exc.strerror})"
                if not os.environ.get(RESTART_CAUSE_ENV):  # the holder says it, not its daemon
                    print(f"scachefs: no syslog or journal here (no /dev/log): logs go to "
                          f"{where}; -o log_file=PATH chooses", file=sys.stderr)
        os.dup2(devnull, 2)
    os.close(devnull)
    if held:
        if root.handlers == held:  # nowhere else to log: stderr, now /dev/null
            root.handlers[:] = [held[0].terminal]
        held[0].pass_on(root.handlers[0])  # what happened before the mount went live


MS_REMOUNT = 32
MS_BIND = 4096


def remount(mountpoint: str, opts: MountOptions, timeout: float = 30.0) -> int:
    """``-o remount`` (mount -o remount, systemctl reload of a .mount unit).

    Applies what can change on a live mount: the generic flags (ro, noexec, nosuid,
    nodev, noatime...), and an upgrade to the code installed now, as
    ``scachefs-stat --upgrade`` does. scachefs's own options cannot change live: a
    difference from the running daemon's is refused, with the options' names.
    """
    import ctypes
    import dataclasses

    from scachefs.stat import StatError, read_stats

    if fuse_mount_at(mountpoint) != "fuse.scachefs":
        raise MountError(f"remount: {mountpoint} is not a scachefs mount")
    try:
        doc = read_stats(mountpoint)
        with open(f"/proc/{int(doc['pid'])}/cmdline", "rb") as cmdline:
            argv = [a.decode(errors="surrogateescape") for a in cmdline.read().split(b"\0")]
    except (StatError, OSError, KeyError, ValueError) as exc:
        raise MountError(f"remount: cannot read the running daemon's options: {exc}"
                         ) from None
    argv = [a for a in argv if a]  # the NUL after the last argument
    start = next((i + 1 for i, a in enumerate(argv) if os.path.basename(a) == "scachefs"), 1)
    running = parse_options(build_parser().parse_args(argv[start:]).options)
    old, new = dataclasses.asdict(running), dataclasses.asdict(opts)
    changed = [name for name in old if name != "kernel_flags" and old[name] != new[name]]
    if changed:
        raise MountError(f"remount of {mountpoint}: {', '.join(changed)} cannot change on a "
                         "live mount (the running mount keeps its values); unmount and "
                         "mount again to change them")
    spec = fuse_mount.MountSpec("", mountpoint, "scachefs", flags=opts.kernel_flags)
    if opts.kernel_flags != running.kernel_flags:
        libc = ctypes.CDLL(None, use_errno=True)
        flags = MS_REMOUNT | MS_BIND | spec.ms_flags()
        if libc.mount(None, os.fsencode(mountpoint), None, ctypes.c_ulong(flags), None) != 0:
            raise MountError(f"remount of {mountpoint}: {os.strerror(ctypes.get_errno())}")
        log.info("remounted %s with %s", mountpoint, ",".join(opts.kernel_flags) or "rw")
    if running.restart != "on":
        log.warning("remount of %s: restart=off, so no upgrade to the code installed now",
                    mountpoint)
        return 0
    # The upgrade as scachefs-stat --upgrade does it, but by signal: a read-only mount
    # refuses the setxattr that asks for it.
    with open(f"/proc/{int(doc['pid'])}/status", encoding="utf-8") as status:
        holder = int(next(line.split()[1] for line in status if line.startswith("PPid:")))
    os.kill(holder, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        with contextlib.suppress(StatError):
            if read_stats(mountpoint).get("generation", 0) > doc.get("generation", 0):
                log.info("remount of %s: upgraded to scachefs %s", mountpoint, __version__)
                return 0
    raise MountError(f"remount of {mountpoint}: no new daemon within {timeout:.0f} s; see "
                     "the log")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    strings = [",".join(o for o in split_option_string(text) if o != "remount")
               for text in args.options]
    is_remount = not args.serve_fds and any(
        "remount" in split_option_string(text) for text in args.options)
    try:
        opts = parse_options(strings)
    except OptionError as exc:
        print(f"scachefs: {exc}", file=sys.stderr)
        return 2
    if opts.log_file:
        try:
            setup_logging(args.debug, log_file=opts.log_file)
        except OSError as exc:
            print(f"scachefs: cannot open log_file {opts.log_file}: {exc.strerror}",
                  file=sys.stderr)
            return 1
    source = os.path.abspath(args.source)
    mountpoint = os.path.abspath(args.mountpoint)
    _LOG_NAME[0] = mountpoint
    if is_remount:
        try:
            return remount(mountpoint, opts)
        except MountError as exc:
            print(f"scachefs: {exc}", file=sys.stderr)
            return 1
    if args.serve_fds:  # the daemon a holder started
        detach = bool(os.environ.get(_DETACHED_ENV))
        if detach:
            _hold_logs()
        return serve_with_fds(source, mountpoint, opts, args.serve_fds, detach=detach)
    daemon_args = [source, mountpoint, "-f", *(f"-o{o}" for o in args.options)]
    if args.debug:
        daemon_args.append("--debug")

    def run(ready: Callable[[], None]) -> int:
        return run_mount(source, mountpoint, opts, args.debug, ready, daemon_args)

    if not args.foreground:
        try:
            # fail fast, before forking
            os.close(_check_dirs(source, mountpoint, opts.require_mount))
        except MountError as exc:
            print(f"scachefs: {exc}", file=sys.stderr)
            return 1
        os.environ[_DETACHED_ENV] = "1"  # the holder's daemons log like it, once detached
        _hold_logs()
        return _daemonize(run)
    try:
        return run(lambda: log.info("mount is live"))
    except MountError as exc:
        log.error("%s", exc)
        return 1
