"""libvirt as the client: a TCG domain whose disk is an overlay under a scachefs mount.

The test starts virtlogd and libvirtd by hand (PID 1 is not systemd) in a host of
their own: a network namespace (libvirtd touches no interface of the machine) whose
mount namespace has private copies of libvirt's config, run, state and log
directories, and the scachefs mounts. qemu runs as libvirt-qemu, as libvirt's
defaults say, with libvirt's dynamic ownership (DAC) on.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest import MARKER, ensure_guest_image
from tests.mounting import require_tool
from tests.netns import Host, NsMount

QEMU_USER = "libvirt-qemu"
# /var/cache/libvirt stays the machine's: it keeps the qemu capabilities libvirtd probes
# (15 s) from one run to the next.
LIBVIRT_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt")
QEMU_CONF = """\
# scachefs test: libvirt's defaults, except what a test host must not touch.
user = "libvirt-qemu"
group = "libvirt-qemu"
dynamic_ownership = 1
remember_owner = 1
security_driver = "none"
cgroup_controllers = [ ]
# no private /dev for qemu: it would try to carry the test's /dev/kvm stand-in into it
namespaces = [ ]
"""


class Libvirt:
    """virtlogd and libvirtd in a host of their own, with private directories."""

    def __init__(self, work: Path) -> None:
        for tool in ("virsh", "libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img"):
            require_tool(tool)
        self.work = work
        self.host = Host("libvirt", f"scfs-{os.getpid()}-libvirt", 0)
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self._private_dirs()
            self.virtlogd = self._daemon("virtlogd", "virtlogd")
            self._wait_for(self.private("/run/libvirt") / "virtlogd-sock", self.virtlogd)
            self.libvirtd = self._daemon("libvirtd", "libvirtd")
            self._wait_for(self.private("/run/libvirt") / "libvirt-sock", self.libvirtd)
            deadline = time.monotonic() + 60
            while self.virsh("version", check=False).returncode != 0:
                assert time.monotonic() < deadline, self.logs()
                time.sleep(0.2)
        except BaseException:
            self.close()
            raise

    def private(self, path: str) -> Path:
        """Where ``path`` of the libvirt host lives, seen from the test."""
        return self.work / "libvirt" / path.strip("/").replace("/", "-")

    def _private_dirs(self) -> None:
        for path in LIBVIRT_DIRS:
            mine = self.private(path)
            if path == "/etc/libvirt":
                shutil.copytree(path, mine, symlinks=True)
                for link in (mine / "qemu" / "networks" / "autostart").glob("*"):
                    link.unlink()  # no default network (no bridge, no dnsmasq)
                (mine / "qemu.conf").write_text(QEMU_CONF)
            else:
                mine.mkdir(parents=True)
                if Path(path).exists():
                    shutil.copystat(path, mine)
            self.host.run("mkdir", "-p", path)
            self.host.run("mount", "--bind", mine, path)
        # This machine has a /dev/kvm (root only) but no hardware virtualization: libvirt
        # 9.0 then probes qemu with KVM, finds KVM unusable for libvirt-qemu, calls its
        # capabilities cache stale and probes again, some 40 s for each define and start.
        # In the libvirt host /dev/kvm is an empty file nobody may open: no KVM, TCG only.
        no_kvm = self.work / "no-kvm"
        no_kvm.write_bytes(b"")
        no_kvm.chmod(0)
        if Path("/dev/kvm").exists():
            self.host.run("mount", "--bind", no_kvm, "/dev/kvm")

    def _daemon(self, name: str, *cmd: str) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "ab")
        proc = self.host.popen(*cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def _wait_for(self, path: Path, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert proc.poll() is None, f"{proc.args} exited:\n{self.logs()}"
            assert time.monotonic() < deadline, f"no {path}:\n{self.logs()}"
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.work.glob("*.log")))

    def virsh(self, *args: str | os.PathLike[str],
              check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host.run("virsh", "--connect", "qemu:///system", *args, check=check,
                             timeout=120)

    def qemu_pid(self, domain: str) -> int:
        return int((self.private("/run/libvirt") / "qemu" / f"{domain}.pid").read_text())

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.host.close()  # kills what is left in it (a qemu), the mount namespace goes


def domain_xml(name: str, disk: Path, work: Path, console: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{work}/vmlinuz</kernel>
    <initrd>{work}/initrd.img</initrd>
    <cmdline>root=/dev/vda ro console=ttyS0 panic=-1</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def open_files(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            out.add(os.readlink(fd))
    return out


def proc_uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


@contextlib.contextmanager
def reachable_dir(prefix: str) -> Iterator[Path]:
    """A directory libvirt-qemu can reach (pytest's tmp_path is not: its parent is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def work() -> Iterator[Path]:
    with reachable_dir("scachefs-libvirt-test-") as path:
        yield path


@pytest.fixture(scope="module")
def libvirt() -> Iterator[Libvirt]:
    """One virtlogd and libvirtd for the module's tests."""
    with reachable_dir("scachefs-libvirt-") as path:
        daemons = Libvirt(path)
        try:
            yield daemons
        finally:
            daemons.close()


def wait_state(lv: Libvirt, domain: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (now := lv.virsh("domstate", domain, check=False).stdout.strip()) != state:
        assert time.monotonic() < deadline, f"{domain} is {now!r}, not {state!r}"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_libvirt_boots_a_domain_from_the_mount_and_runs_a_pool_on_it(
        libvirt: Libvirt, work: Path) -> None:
    qemu_uid = pwd.getpwnam(QEMU_USER).pw_uid
    image = ensure_guest_image()
    store, mnt = work / "images", work / "mnt"
    store.mkdir()
    mnt.mkdir()
    shutil.copyfile(image.base, store / "base.qcow2")  # libvirt chowns it: not the cache's
    for name in ("vmlinuz", "initrd.img"):
        shutil.copyfile(image.base.parent / name, work / name)
    t0 = time.monotonic()

    def step(what: str) -> None:
        print(f"libvirt test: {what} at {time.monotonic() - t0:.1f} s", flush=True)

    mount = NsMount(libvirt.host, store, mnt, ["allow_other", "host_id=libvirt"],
                    work / "scachefs.log")
    try:
        libvirt.host.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2",
                         "-F", "qcow2", mnt / "vm1.qcow2")
        console = work / "vm1.console"
        (work / "vm1.xml").write_text(domain_xml("scachefs-vm1", mnt / "vm1.qcow2", work,
                                                 console))
        libvirt.virsh("define", work / "vm1.xml")
        step("vm1 defined")
        started = time.monotonic()
        libvirt.virsh("start", "scachefs-vm1")
        pid = libvirt.qemu_pid("scachefs-vm1")
        # qemu runs as libvirt-qemu and holds the overlay and the base through the mount.
        assert proc_uid(pid) == qemu_uid
        files = open_files(pid)
        assert str(mnt / "vm1.qcow2") in files and str(mnt / "base.qcow2") in files, files
        # Dynamic ownership went through the mount to the store.
        assert (store / "vm1.qcow2").stat().st_uid == qemu_uid
        assert (store / "base.qcow2").stat().st_uid == qemu_uid
        # The guest reaches multi-user (the marker on its serial console), then powers off.
        deadline = time.monotonic() + 600
        while MARKER not in (console.read_text(errors="replace") if console.exists() else ""):
            assert time.monotonic() < deadline, (console.read_text(errors="replace")[-3000:]
                                                 if console.exists() else libvirt.logs())
            time.sleep(0.5)
        boot_seconds = time.monotonic() - started
        print(f"libvirt: boot to multi-user in {boot_seconds:.1f} s")
        layer = mount.layer("base.qcow2")
        assert layer["miss_bytes"] + layer["hit_bytes"] > 10 << 20, layer
        assert layer["trace"]["status"] in ("recording", "ready"), layer
        # The guest powers itself off after the marker; destroy it if it is still up.
        libvirt.virsh("destroy", "scachefs-vm1", check=False)
        wait_state(libvirt, "scachefs-vm1", "shut off", 60)
        # remember_owner: libvirtd opened the base O_RDWR at the stop and wrote nothing;
        # that must not cost the base its cache (other VMs may still run from it).
        log_text = (work / "scachefs.log").read_text(errors="replace")
        assert "opened for writing" not in log_text, log_text[-3000:]
        assert mount.layer("base.qcow2")["resident_bytes"] >= layer["resident_bytes"] > 0
        # libvirt gave the overlay back to root; the shared base stays libvirt-qemu's
        # (libvirt does not restore backing images: other domains may use them).
        assert (store / "vm1.qcow2").stat().st_uid == 0
        assert (store / "base.qcow2").stat().st_uid == qemu_uid
        libvirt.virsh("undefine", "scachefs-vm1")
        step("vm1 booted, destroyed and undefined")

        # A storage pool on the mount: list, and create an overlay with a backing volume.
        libvirt.virsh("pool-define-as", "scachefs", "dir", "--target", mnt)
        libvirt.virsh("pool-start", "scachefs")
        step("pool started")
        volumes = libvirt.virsh("vol-list", "scachefs").stdout
        assert "base.qcow2" in volumes and "vm1.qcow2" in volumes, volumes
        libvirt.virsh("vol-create-as", "scachefs", "vm2.qcow2", "2G", "--format", "qcow2",
                      "--backing-vol", "base.qcow2", "--backing-vol-format", "qcow2")
        info = libvirt.host.run("qemu-img", "info", mnt / "vm2.qcow2").stdout
        assert f"backing file: {mnt}/base.qcow2" in info, info
        assert (store / "vm2.qcow2").exists()
        step("volume created")
        vol = libvirt.virsh("vol-dumpxml", "--pool", "scachefs", "vm2.qcow2").stdout
        assert "<backingStore>" in vol and f"{mnt}/base.qcow2" in vol, vol
        # A domain on the new volume starts from the same shared layer; destroy it.
        (work / "vm2.xml").write_text(domain_xml("scachefs-vm2", mnt / "vm2.qcow2", work,
                                                 work / "vm2.console"))
        libvirt.virsh("define", work / "vm2.xml")
        libvirt.virsh("start", "scachefs-vm2")
        step("vm2 started")
        pid = libvirt.qemu_pid("scachefs-vm2")
        assert proc_uid(pid) == qemu_uid
        files = open_files(pid)
        assert str(mnt / "vm2.qcow2") in files and str(mnt / "base.qcow2") in files, files
        stats = mount.stats()
        assert [la["images"] for la in stats["layers"] if la["path"] == "base.qcow2"] == [2]
        libvirt.virsh("destroy", "scachefs-vm2")
        libvirt.virsh("undefine", "scachefs-vm2")
        assert (store / "vm2.qcow2").stat().st_uid == 0
        assert (store / "base.qcow2").stat().st_uid == qemu_uid
        libvirt.virsh("vol-delete", "--pool", "scachefs", "vm2.qcow2")
        assert not (store / "vm2.qcow2").exists()
        libvirt.virsh("pool-destroy", "scachefs")
        libvirt.virsh("pool-undefine", "scachefs")
        step("pool gone")
    finally:
        for domain in ("scachefs-vm1", "scachefs-vm2"):
            libvirt.virsh("destroy", domain, check=False)
            libvirt.virsh("undefine", domain, check=False)
        mount.unmount()
    assert not mount.bad_log_lines(), mount.bad_log_lines()


@pytest.mark.timeout(300)
def test_without_allow_other_libvirt_says_permission_denied_and_scachefs_stat_says_why(
        libvirt: Libvirt, work: Path) -> None:
    store, mnt = work / "images", work / "mnt"
    store.mkdir()
    mnt.mkdir()
    libvirt.host.run("qemu-img", "create", "-q", "-f", "qcow2", store / "base.qcow2", "64M")
    libvirt.host.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
                     "qcow2", store / "vm.qcow2")
    for name in ("vmlinuz", "initrd.img"):  # never booted: any file will do
        (work / name).write_bytes(b"\0" * 4096)
    mount = NsMount(libvirt.host, store, mnt, [], work / "scachefs.log")
    try:
        (work / "vm.xml").write_text(domain_xml("scachefs-denied", mnt / "vm.qcow2", work,
                                                work / "vm.console"))
        libvirt.virsh("define", work / "vm.xml")
        result = libvirt.virsh("start", "scachefs-denied", check=False)
        assert result.returncode != 0
        uid = pwd.getpwnam(QEMU_USER).pw_uid
        # libvirt's words (libvirt 9.0): it checks the disk as the qemu user first.
        assert re.search(rf"Cannot access storage file '{re.escape(str(mnt))}/vm.qcow2' "
                         rf"\(as uid:{uid}, gid:\d+\): Permission denied", result.stderr), \
            result.stderr
        # scachefs-stat says what is missing.
        out = libvirt.host.run(sys.executable, "-m", "scachefs.stat", mnt).stdout
        assert "allow_other: no" in out and "-o allow_other" in out, out
        libvirt.virsh("undefine", "scachefs-denied")
    finally:
        libvirt.virsh("undefine", "scachefs-denied", check=False)
        mount.unmount()
    # With allow_other the same disk is accessible to the qemu user.
    mount = NsMount(libvirt.host, store, mnt, ["allow_other"], work / "scachefs-2.log")
    try:
        check = libvirt.host.run("setpriv", f"--reuid={QEMU_USER}", "--regid=kvm",
                                 "--clear-groups", "--", "stat", "-c", "%s",
                                 mnt / "vm.qcow2", check=False)
        assert check.returncode == 0, check.stderr
        out = libvirt.host.run(sys.executable, "-m", "scachefs.stat", mnt).stdout
        assert "allow_other: yes" in out, out
    finally:
        mount.unmount()
