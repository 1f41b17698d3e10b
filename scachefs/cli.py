"""The ``scachefs`` command: parse arguments, mount, serve until unmounted or signalled.

Without ``-f`` the command forks and returns only once the mount answers
requests, with a non-zero exit and the reason when it does not, so that mount(8),
systemd and scripts can rely on the mount being live when it returns.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import resource
import signal
import socket
import stat
import sys
from collections.abc import Callable

import pyfuse3
import trio

from scachefs import __version__
from scachefs.fs import ScacheFS
from scachefs.options import MountOptions, OptionError, parse_options

log = logging.getLogger("scachefs")

OPTIONS_HELP = """\
mount options (-o name[=value],...):
  allow_other          let users other than the mounting one use the mount; the kernel
                       still checks every access against the store's owners and modes
                       (default_permissions is always on)
  ro                   mount read-only (also: nodev, nosuid, noexec, noatime, ...)
  cache_size=SIZE      memory budget of the shared layer cache, e.g. 512M, 2G, 10%
                       (of RAM); default: 25% of RAM
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
  defaults, auto, noauto, nofail, _netdev, user, users, rw, x-*, comment=*
                       fstab and systemd options: accepted and ignored

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
    return parser


class _KernelGaveUpFilter(logging.Filter):
    """Demote pyfuse3's error for replies the kernel no longer waits for.

    Writing a reply fails with ENOENT when the request was interrupted or the
    mount went away meanwhile (e.g. a release racing an unmount): nothing is lost,
    so it is not an error an operator must act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pyfuse3" and "failed with No such file or directory" in (
                record.getMessage()):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


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
    handler.addFilter(_KernelGaveUpFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _escape(value: str) -> str:
    """Escape a value for libfuse's comma-separated option parser."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def fuse_options(source: str, opts: MountOptions, debug: bool) -> set[str]:
    """The libfuse mount options for this mount."""
    result = {f"fsname={_escape(source)}", "subtype=scachefs", "default_permissions"}
    if opts.allow_other:
        result.add("allow_other")
    result.update(opts.kernel_flags)
    if debug:
        result.add("debug")
    return result


def notify_systemd(message: str) -> None:
    """sd_notify(3) without a dependency: one datagram to $NOTIFY_SOCKET, if set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)


class MountError(Exception):
    """The mount could not be made; the message says why and what to do."""


def _check_dirs(source: str, mountpoint: str) -> int:
    """Open SOURCE before mounting (it may be hidden by the mount) and check MOUNTPOINT."""
    try:
        root_fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
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


async def _serve(ops: ScacheFS, mountpoint: str, max_tasks: int,
                 ready: Callable[[], None]) -> None:
    async with trio.open_nursery() as nursery:

        async def wait_ready() -> None:
            # The mount is live once a request through it is answered by our loop.
            await trio.to_thread.run_sync(os.stat, mountpoint)
            ready()
            notify_systemd(f"READY=1\nSTATUS=serving {ops.source} at {mountpoint}")

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s, unmounting", signal.Signals(signum).name)
                    notify_systemd("STOPPING=1")
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        nursery.start_soon(wait_ready)
        await ops.background(nursery)
        await pyfuse3.main(min_tasks=4, max_tasks=max_tasks)
        nursery.cancel_scope.cancel()


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
              ready: Callable[[], None]) -> None:
    """Mount, serve until unmounted or signalled, then clean up. Raises MountError."""
    raise_fd_limit()
    root_fd = _check_dirs(source, mountpoint)
    os.umask(0)  # modes from callers arrive with their umask already applied
    ops = ScacheFS(root_fd, opts, source, mountpoint)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options(source, opts, debug))
    except RuntimeError as exc:
        raise MountError(f"mounting {source} on {mountpoint} failed: {exc} "
                         "(is /dev/fuse available and fuse3 installed?)") from None
    log.info("mounted %s on %s (cache budget %d MiB, %d open files at most)", source,
             mountpoint, opts.cache_budget() >> 20, ops.fd_limit)
    try:
        trio.run(_serve, ops, mountpoint, opts.max_tasks, ready)
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


def _daemonize(run: Callable[[Callable[[], None]], None]) -> int:
    """Fork; the parent returns 0 once the child reports the mount live, else 1."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
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
        run(ready)
    except MountError as exc:
        log.error("%s", exc)
        os.write(write_fd, f"scachefs: {exc}\n".encode())
        code = 1
    except BaseException:
        log.exception("daemon failed")
        code = 1
    finally:
        if not reported:
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


def _detach_output() -> None:
    """Let go of the caller's stdout/stderr once mounted, so `$(scachefs ...)` returns.

    Logs then go to the journal (stderr under systemd), a log_file if one was given,
    or syslog (/dev/log).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    root = logging.getLogger()
    if not _stderr_is_journal():
        if any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr
               for h in root.handlers) and os.path.exists("/dev/log"):
            setup_logging(root.level == logging.DEBUG, to_syslog=True)
        os.dup2(devnull, 2)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    try:
        opts = parse_options(args.options)
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

    def run(ready: Callable[[], None]) -> None:
        run_mount(source, mountpoint, opts, args.debug, ready)

    if not args.foreground:
        try:
            os.close(_check_dirs(source, mountpoint))  # fail fast, before forking
        except MountError as exc:
            print(f"scachefs: {exc}", file=sys.stderr)
            return 1
        return _daemonize(run)
    try:
        run(lambda: log.info("mount is live"))
    except MountError as exc:
        log.error("%s", exc)
        return 1
    return 0
