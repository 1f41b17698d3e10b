"""A real, small, bootable Debian 12 guest for boot-storm tests under TCG.

`ensure_guest_image()` builds (once, cached in CACHE_DIR/v{GUEST_VERSION}/) a qcow2 base image
holding a bare ext4 root file system made with debootstrap from the apt mirror this machine
already uses, the guest's kernel, and a tiny busybox initramfs that loads the virtio modules and
switch_root's to /dev/vda. `boot()` boots an overlay of that base under
`qemu-system-x86_64 -accel tcg`; the guest prints MARKER on its serial console once it reaches
multi-user.target and then powers itself off.

Host packages: debootstrap, busybox-static, e2fsprogs (mkfs.ext4 -d), qemu-utils,
qemu-system-x86, util-linux (unshare).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

GUEST_VERSION: int = 3  # bump to force a rebuild
CACHE_DIR = Path(os.environ.get("SCACHEFS_GUEST_CACHE", "/var/cache/scachefs-guest"))

SUITE = "bookworm"
HOSTNAME = "scachefs-guest"
MARKER = "SCACHEFS-BOOT-DONE"
JOB_BEGIN, JOB_END = "SCACHEFS-JOB-BEGIN", "SCACHEFS-JOB-END"
# Jobs the guest runs at multi-user before its marker when booted with scachefs.job=NAME;
# their output is printed between JOB_BEGIN and JOB_END on the serial console.
JOBS = {
    # 4 KiB random read/write with O_DIRECT on a file of the root file system, which
    # lives in the VM's own overlay: the disk I/O of a database-like guest.
    "fio-randrw": "fio --name=guest --directory=/var/tmp --size=128M --direct=1 "
                  "--ioengine=libaio --iodepth=16 --rw=randrw --bs=4k --time_based "
                  "--runtime=15 --randrepeat=0 --output-format=json",
    # Writes 24 files of 2 MiB with fsync, then checks them: the guest's own view of
    # its disk through whatever happens to the host meanwhile.
    "write-files": "sh -c 'mkdir -p /var/tmp/w && for i in $(seq 1 24); do "
                   "dd if=/dev/urandom of=/var/tmp/w/f$i bs=1M count=2 conv=fsync "
                   "status=none; done && cd /var/tmp/w && sha256sum f* > ../sums && "
                   "sync && echo 3 > /proc/sys/vm/drop_caches && sha256sum -c ../sums "
                   "&& echo WRITE-FILES-OK'",
}
IMAGE_BYTES = 2 << 30
CLUSTER_SIZE = 65536
# A realistic-ish server: systemd, udev, dbus, sshd, cron, rsyslog (plus the kernel).
PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "kmod", "openssh-server", "cron", "rsyslog",
    "logrotate", "procps", "iproute2", "linux-image-cloud-amd64",
    "fio",  # for jobs: I/O benchmarks inside the guest (see JOBS)
)
# Kernel modules the initramfs needs to reach /dev/vda (deps come from modules.dep).
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4")
POWEROFF_GRACE = 60.0  # seconds qemu gets to exit after the marker before it is killed
_BUILD_TIMEOUT = 1800.0
_TOOLS = ("debootstrap", "unshare", "mkfs.ext4", "qemu-img", "busybox")
# debootstrap and mkfs.ext4 live in sbin, which a caller's PATH may lack.
_PATH = ":".join(dict.fromkeys([*os.environ.get("PATH", "").split(":"), "/usr/local/sbin",
                                "/usr/sbin", "/usr/bin", "/sbin", "/bin"]))


@dataclass(frozen=True)
class GuestImage:
    """A built guest: qcow2 base (bare ext4, 64 KiB clusters), kernel and initramfs."""

    base: Path
    kernel: Path
    initrd: Path


@dataclass
class BootResult:
    """One boot: wall seconds to the marker (or to the end), whether it came, the console."""

    seconds: float
    reached_multi_user: bool
    console: str
    returncode: int | None = None  # qemu's exit status; None when it had to be killed

    def job_output(self) -> str:
        """What the guest's job printed (between JOB_BEGIN and JOB_END)."""
        begin = self.console.find(JOB_BEGIN)
        end = self.console.find(JOB_END, begin + 1)
        if begin < 0 or end < 0:
            raise AssertionError(f"the guest printed no job output:\n{self.console[-3000:]}")
        return self.console[begin + len(JOB_BEGIN):end].strip()


class GuestBuildError(RuntimeError):
    """Building the guest image failed."""


# --------------------------------------------------------------------------- building


def ensure_guest_image(progress: Callable[[str], None] = print) -> GuestImage:
    """Build the guest into CACHE_DIR/v{GUEST_VERSION}/ unless it is there; return it."""
    final = CACHE_DIR / f"v{GUEST_VERSION}"
    if (final / "build.json").exists():
        return _image_in(final)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE_DIR / ".lock", progress) as lock_fd:
        if (final / "build.json").exists():  # another caller built it while we waited
            return _image_in(final)
        for stale in CACHE_DIR.glob(".build-*"):  # left by a build that died; we hold the lock
            progress(f"guest: removing stale build directory {stale}")
            _remove_tree(stale)
        work = CACHE_DIR / f".build-v{GUEST_VERSION}-{os.getpid()}"
        work.mkdir()
        try:
            _build(work, lock_fd, progress)
            os.sync()
            os.rename(work, final)
        except BaseException:
            _remove_tree(work)
            raise
    progress(f"guest: ready in {final}")
    return _image_in(final)


def _image_in(directory: Path) -> GuestImage:
    return GuestImage(base=directory / "base.qcow2", kernel=directory / "vmlinuz",
                      initrd=directory / "initrd.img")


@contextlib.contextmanager
def _locked(path: Path, progress: Callable[[str], None]) -> Iterator[int]:
    """Hold an exclusive flock on path; yields the fd (pass it to children to keep the lock)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"guest: waiting for another build of the guest image ({path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _build(work: Path, lock_fd: int, progress: Callable[[str], None]) -> None:
    """Build everything into work/: base.qcow2, vmlinuz, initrd.img, build.json."""
    started = time.monotonic()
    missing = [tool for tool in _TOOLS if shutil.which(tool, path=_PATH) is None]
    if missing:
        raise GuestBuildError(f"missing host tools {missing}: install debootstrap, "
                              "busybox-static, e2fsprogs, qemu-utils and util-linux")
    if os.geteuid() != 0:
        raise GuestBuildError("building the guest image needs root (debootstrap)")
    mirror = os.environ.get("SCACHEFS_GUEST_MIRROR") or find_apt_mirror()
    root = work / "root"
    progress(f"guest: debootstrap {SUITE} from {mirror} into {root} (about 1-3 minutes)")
    _debootstrap(root, mirror, work / "debootstrap.log", lock_fd, progress)
    t_debootstrap = time.monotonic() - started

    kver = _kernel_version(root)
    progress(f"guest: configuring the guest (kernel {kver})")
    _configure_guest(root)
    shutil.copyfile(root / "boot" / f"vmlinuz-{kver}", work / "vmlinuz")
    modules = _write_initramfs(root, kver, work / "initrd.img")
    progress(f"guest: initramfs with busybox and {', '.join(modules)}")
    packages = _dpkg_versions(root)
    (work / "packages.txt").write_text("".join(f"{name} {version}\n"
                                               for name, version in sorted(packages.items())))
    rootfs_bytes = _tree_bytes(root)

    raw = work / "root.ext4"
    progress(f"guest: mkfs.ext4 -d ({rootfs_bytes >> 20} MiB of files into a 2 GiB image)")
    with raw.open("wb") as f:
        f.truncate(IMAGE_BYTES)
    # Inode tables and journal are zeroed now, so that no ext4lazyinit writes during a boot.
    _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-E", "lazy_itable_init=0,lazy_journal_init=0",
          "-d", str(root), str(raw)], lock_fd)
    _remove_tree(root)
    base = work / "base.qcow2"
    progress(f"guest: qemu-img convert -O qcow2 -o cluster_size={CLUSTER_SIZE}")
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER_SIZE}",
          str(raw), str(base)], lock_fd)
    raw.unlink()
    for path in (base, work / "vmlinuz", work / "initrd.img"):
        path.chmod(0o444)

    build_seconds = round(time.monotonic() - started, 1)
    base_bytes = base.stat().st_size
    info = {
        "guest_version": GUEST_VERSION,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": build_seconds,
        "debootstrap_seconds": round(t_debootstrap, 1),
        "suite": SUITE,
        "mirror": mirror,
        "kernel": kver,
        "initramfs_modules": modules,
        "base_bytes": base_bytes,
        "base_virtual_bytes": IMAGE_BYTES,
        "cluster_size": CLUSTER_SIZE,
        "rootfs_file_bytes": rootfs_bytes,
        "package_count": len(packages),
        "versions": {name: packages.get(name) for name in
                     ("systemd", "udev", "dbus", "openssh-server", "cron", "rsyslog",
                      f"linux-image-{kver}")},
        "host": {"debootstrap": _host_version("debootstrap"),
                 "busybox-static": _host_version("busybox-static"),
                 "e2fsprogs": _host_version("e2fsprogs"),
                 "qemu-utils": _host_version("qemu-utils")},
    }
    (work / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    progress(f"guest: built in {build_seconds} s, base.qcow2 {base_bytes / 2**20:.0f} MiB")


def find_apt_mirror() -> str:
    """The Debian mirror (URI serving SUITE main) from this machine's apt sources."""
    sources = Path("/etc/apt/sources.list")
    candidates = ([sources] if sources.exists() else []) + sorted(
        Path("/etc/apt/sources.list.d").glob("*.list")) + sorted(
        Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in candidates:
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[0].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if (fields.get("enabled", "yes").lower() != "no"
                        and "deb" in fields.get("types", "").split()
                        and SUITE in fields.get("suites", "").split()
                        and "main" in fields.get("components", "").split()):
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE \
                        and "main" in words[3:]:
                    return words[1]
    raise GuestBuildError(f"no apt source for Debian {SUITE} main in /etc/apt: "
                          "set SCACHEFS_GUEST_MIRROR")


def _debootstrap(root: Path, mirror: str, log: Path, lock_fd: int,
                 progress: Callable[[str], None]) -> None:
    """Run debootstrap in a private mount namespace (its mounts vanish with it)."""
    cmd = ["unshare", "--mount", "--propagation", "private", "debootstrap", "--variant=minbase",
           f"--include={','.join(PACKAGES)}", SUITE, str(root), mirror]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8", PATH=_PATH)
    phases: set[str] = set()
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, pass_fds=(lock_fd,),
                                text=True, errors="replace", start_new_session=True)
        assert proc.stdout is not None
        deadline = time.monotonic() + _BUILD_TIMEOUT
        try:
            for line in proc.stdout:
                log_file.write(line)
                words = line.split()
                if line.startswith(("W:", "E:")):
                    progress(f"guest: debootstrap {line.rstrip()}")
                elif len(words) >= 2 and words[0] == "I:" and (
                        words[1] not in phases
                        or (len(words) >= 4 and line.rstrip().endswith("..."))):
                    phases.add(words[1])  # the first line of each kind, and each phase heading
                    progress(f"guest: debootstrap {line.rstrip()}")
                if time.monotonic() > deadline:
                    raise GuestBuildError(f"debootstrap took over {_BUILD_TIMEOUT} s")
            returncode = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: stop debootstrap and its dpkg children
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise GuestBuildError(f"debootstrap failed ({returncode}); end of {log}:\n{tail}")


def _kernel_version(root: Path) -> str:
    versions = sorted(p.name for p in (root / "lib/modules").iterdir()
                      if (root / "boot" / f"vmlinuz-{p.name}").exists())
    if not versions:
        raise GuestBuildError("debootstrap installed no kernel")
    return versions[-1]


_MARKER_SCRIPT = f"""#!/bin/sh
# scachefs test guest: tell the host that multi-user.target was reached.
read -r up _ < /proc/uptime
printf '\\n{MARKER} uptime=%s\\n' "$up" > /dev/ttyS0
"""

_JOB_SCRIPT = "\n".join([
    "#!/bin/sh",
    "# scachefs test guest: run the job named by scachefs.job= on the kernel command line.",
    "job=$(sed -n 's/.*scachefs\\.job=\\([a-z0-9-]*\\).*/\\1/p' /proc/cmdline)",
    'case "$job" in',
    *(f"  {name}) {command} > /var/tmp/job.out 2>&1 ;;" for name, command in JOBS.items()),
    "  *) exit 0 ;;",
    "esac",
    f"printf '\\n{JOB_BEGIN}\\n' > /dev/ttyS0",
    "cat /var/tmp/job.out > /dev/ttyS0",
    f"printf '\\n{JOB_END}\\n' > /dev/ttyS0",
    "",
])

_MARKER_UNIT = """[Unit]
Description=scachefs test guest: announce multi-user.target, then power off
After=multi-user.target

[Service]
Type=oneshot
TimeoutStartSec=600
ExecStart=/usr/local/sbin/scachefs-job
ExecStart=/usr/local/sbin/scachefs-boot-done
ExecStart=/bin/systemctl --no-block poweroff

[Install]
WantedBy=multi-user.target
"""


def _configure_guest(root: Path) -> None:
    """Hostname, fstab, the marker unit, no network waits, no host leftovers."""
    etc = root / "etc"
    (etc / "hostname").write_text(f"{HOSTNAME}\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"
                               "::1\t\tlocalhost ip6-localhost ip6-loopback\n")
    (etc / "fstab").write_text("# <file system> <mount point> <type> <options> <dump> <pass>\n"
                               "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n")
    machine_id = etc / "machine-id"
    if not machine_id.exists() or len(machine_id.read_text().strip()) != 32:
        # A fixed id: the image is "already booted", so no first-boot presets run.
        machine_id.write_text(hashlib.md5(f"{HOSTNAME}-{GUEST_VERSION}".encode()).hexdigest()
                              + "\n")
    for leftover in (etc / "resolv.conf",):  # copied from the build host
        leftover.unlink(missing_ok=True)
    leftover_debs = root / "var/cache/apt/archives"
    for deb in leftover_debs.glob("*.deb"):
        deb.unlink()
    for cache in (root / "var/cache/apt").glob("*.bin"):
        cache.unlink()
    for lst in (root / "var/lib/apt/lists").iterdir():
        if lst.is_file() and lst.name != "lock":
            lst.unlink()

    script = root / "usr/local/sbin/scachefs-boot-done"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(_MARKER_SCRIPT)
    script.chmod(0o755)
    job = root / "usr/local/sbin/scachefs-job"
    job.write_text(_JOB_SCRIPT)
    job.chmod(0o755)
    system = etc / "systemd/system"
    (system / "scachefs-boot-done.service").write_text(_MARKER_UNIT)
    _symlink(system / "multi-user.target.wants/scachefs-boot-done.service",
             "/etc/systemd/system/scachefs-boot-done.service")
    _symlink(system / "default.target", "/lib/systemd/system/multi-user.target")
    # Nothing may wait for a network the guest does not have.
    for unit in ("systemd-networkd-wait-online.service", "NetworkManager-wait-online.service",
                 "ifupdown-wait-online.service", "systemd-time-wait-sync.service"):
        _symlink(system / unit, "/dev/null")


def _symlink(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def _module_files(root: Path, kver: str) -> list[Path]:
    """Module files (relative to the modules dir) for INITRAMFS_MODULES, deps first."""
    moddir = root / "lib/modules" / kver
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name] = rest.split()
    by_name = {_module_name(path): path for path in deps}
    builtin = {_module_name(line) for line in
               (moddir / "modules.builtin").read_text().split()}
    ordered: list[str] = []

    def visit(path: str) -> None:
        if path in ordered:
            return
        # modules.dep lists deps so that modprobe loads them last to first.
        for dep in reversed(deps[path]):
            visit(dep)
        ordered.append(path)

    for module in INITRAMFS_MODULES:
        if module in by_name:
            visit(by_name[module])
        elif module not in builtin:
            raise GuestBuildError(f"kernel {kver} has no module {module}")
    return [Path(p) for p in ordered]


def _module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1].split(".ko", 1)[0]
    return name.replace("-", "_")


def _read_module(path: Path) -> bytes:
    """A module's bytes, decompressed (busybox insmod wants plain .ko files)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], check=True,
                              capture_output=True).stdout
    return data


_INIT = """#!/bin/busybox sh
# scachefs test guest initramfs: virtio modules, /dev/vda read-only, switch_root.
export PATH=/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
fail() { echo "initramfs: $*"; /bin/busybox poweroff -f; }
for m in @MODULES@; do
  /bin/busybox insmod /lib/modules/$m.ko || fail "insmod $m failed"
done
n=0
while [ ! -b /dev/vda ]; do
  n=$((n + 1))
  [ $n -gt 600 ] && fail "no /dev/vda after 60 s"
  /bin/busybox usleep 100000
done
/bin/busybox mount -t ext4 -o ro /dev/vda /newroot || fail "cannot mount /dev/vda"
for d in dev proc sys; do /bin/busybox mount --move /$d /newroot/$d; done
exec /bin/busybox switch_root /newroot /sbin/init
"""


def _write_initramfs(root: Path, kver: str, out: Path) -> list[str]:
    """Write a gzipped newc cpio: busybox, /init and the virtio modules; return their names."""
    moddir = root / "lib/modules" / kver
    modules = _module_files(root, kver)
    names = [_module_name(str(m)) for m in modules]
    busybox = _static_busybox()
    cpio = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        cpio.add(directory, stat.S_IFDIR | 0o755)
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add("bin/busybox", stat.S_IFREG | 0o755, busybox)
    cpio.add("bin/sh", stat.S_IFLNK | 0o777, b"busybox")
    cpio.add("init", stat.S_IFREG | 0o755,
             _INIT.replace("@MODULES@", " ".join(names)).encode())
    for module, name in zip(modules, names, strict=True):
        cpio.add(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, _read_module(moddir / module))
    out.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    return names


def _static_busybox() -> bytes:
    """The host's busybox binary, which must be statically linked (package busybox-static)."""
    path = Path(shutil.which("busybox", path=_PATH) or "/bin/busybox").resolve()
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError(f"{path} is not a 64-bit ELF binary")
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        if int.from_bytes(data[phoff + i * phentsize:][:4], "little") == 3:  # PT_INTERP
            raise GuestBuildError(f"{path} is dynamically linked: install busybox-static")
    return data


class _Cpio:
    """A minimal writer of the newc cpio format the kernel unpacks as its initramfs."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 0

    def add(self, name: str, mode: int, data: bytes = b"",
            rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._buf.write(b"070701" + b"".join(b"%08X" % v for v in fields) + encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self._buf.getvalue()


def _dpkg_versions(root: Path) -> dict[str, str]:
    """{package: version} of the installed packages in the guest's dpkg status."""
    versions: dict[str, str] = {}
    for stanza in (root / "var/lib/dpkg/status").read_text(errors="replace").split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Status): (.*)$", stanza, re.M))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            versions[fields["Package"]] = fields.get("Version", "")
    return versions


def _host_version(package: str) -> str | None:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() or None


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _run(cmd: list[str], lock_fd: int) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                          pass_fds=(lock_fd,), timeout=_BUILD_TIMEOUT, check=False,
                          env=dict(os.environ, PATH=_PATH))
    if proc.returncode != 0:
        raise GuestBuildError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


def _remove_tree(path: Path) -> None:
    """rm -rf path, but first unmount anything mounted below it (never delete into /proc)."""
    if not path.exists():
        return
    prefix = os.path.realpath(path) + "/"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        targets = [line.split()[1].replace("\\040", " ") for line in mounts]
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- booting

BASE_NAME = "debian.qcow2"


def place_base(image: GuestImage, store: Path) -> Path:
    """The guest's base in a store as BASE_NAME: a hard link when the store is on the
    cache's file system, else a copy."""
    dst = store / BASE_NAME
    try:
        os.link(image.base, dst)
    except OSError:
        shutil.copy2(image.base, dst)  # keeps its old mtime: a settled identity
    return dst


def new_overlay(store: Path, name: str) -> Path:
    """A fresh qcow2 overlay in the store on its placed base (named relative to it)."""
    path = store / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", BASE_NAME, "-F", "qcow2",
                    str(path)], check=True, capture_output=True, text=True)
    return path


def boot(overlay: Path, image: GuestImage, memory_mib: int = 512, timeout: float = 300,
         cache: str = "none", extra_args: Sequence[str] = (), job: str | None = None
         ) -> BootResult:
    """Boot overlay under TCG until the guest prints MARKER and powers off (or timeout).

    With ``job`` (a key of JOBS) the guest runs it before the marker; its output is
    :meth:`BootResult.job_output`.
    """
    drive = os.fspath(overlay).replace(",", ",,")
    append = "root=/dev/vda ro console=ttyS0 panic=-1"
    if job is not None:
        assert job in JOBS, job
        # The job prints on the serial console; the getty there starts late (Type=idle)
        # and its vhangup() would fail a write of the job's output that is under way.
        append += f" scachefs.job={job} systemd.mask=serial-getty@ttyS0.service"
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-smp", "2", "-m", str(memory_mib),
           "-nographic", "-no-reboot", "-nic", "none",
           "-kernel", os.fspath(image.kernel), "-initrd", os.fspath(image.initrd),
           "-append", append,
           "-drive", f"file={drive},if=virtio,format=qcow2,cache={cache}",
           *extra_args]
    marker = MARKER.encode() + b" uptime="
    output = bytearray()
    seen = threading.Event()
    marker_at: list[float] = []

    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    stdout = proc.stdout

    def reader() -> None:
        while chunk := os.read(stdout.fileno(), 65536):
            search_from = max(0, len(output) - len(marker))
            output.extend(chunk)
            if not marker_at and output.find(marker, search_from) >= 0:
                marker_at.append(time.monotonic())
                seen.set()
        seen.set()  # EOF: qemu is gone

    thread = threading.Thread(target=reader, name="qemu-console", daemon=True)
    thread.start()
    returncode: int | None = None
    try:
        seen.wait(timeout)
        wait_for = POWEROFF_GRACE if marker_at else max(0.0, started + timeout - time.monotonic())
        returncode = proc.wait(wait_for)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        thread.join(10)
        stdout.close()
    ended = marker_at[0] if marker_at else time.monotonic()
    console = output.decode(errors="replace").replace("\r\n", "\n")
    return BootResult(seconds=ended - started, reached_multi_user=bool(marker_at),
                      console=console, returncode=returncode)
