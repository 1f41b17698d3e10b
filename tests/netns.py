"""Hosts as network namespaces: one store host and compute hosts, joined by veth pairs.

Used by tests/test_multihost.py and ``bench/storm --hosts``. Every address lives
only inside the namespaces made here (``10.213.0.0/16``); the machine's own
interfaces, routes and addresses are never touched, and everything is removed on
``close()``.

Each host is a long-lived holder process (``ip netns exec NS sleep infinity``)
whose network *and mount* namespaces commands enter with ``nsenter``: every
``ip netns exec`` gets a fresh mount namespace, so a FUSE mount made by one call
would be gone in the next. Mounts made in a host (sshfs, the GlusterFS client,
scachefs) are seen only by that host's commands.

Topology: the store host has ``10.213.0.1`` on its loopback; compute host ``i``
has a point-to-point link ``10.213.i.2 <-> 10.213.i.1`` to it (``s<i>`` on the
store side) and a route to ``10.213.0.1`` over it. The store side's counters of
``s<i>`` are what the store sent to host ``i``: its bytes over the wire.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.mounting import Mount, require_tool, run

REPO = Path(__file__).resolve().parent.parent
STORE_ADDR = "10.213.0.1"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


class Host:
    """A network namespace with a holder process whose namespaces commands enter."""

    def __init__(self, name: str, ns: str, index: int) -> None:
        self.name = name
        self.ns = ns
        self.index = index  # 0 for the store host
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        # ip execs sleep: the holder's pid is the sleep's, in the namespace ip made.
        self.holder = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "infinity"],
                                       stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/net") == os.readlink(
                "/proc/self/ns/net"):
            assert time.monotonic() < deadline, f"the holder of {ns} did not enter it"
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.holder.pid

    @property
    def address(self) -> str:
        return STORE_ADDR if self.index == 0 else f"10.213.{self.index}.2"

    def cmd(self, *args: str | os.PathLike[str]) -> list[str]:
        return ["nsenter", f"--target={self.pid}", "--mount", "--net", f"--wd={REPO}", "--",
                *(os.fspath(a) for a in args)]

    def run(self, *args: str | os.PathLike[str], check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(*self.cmd(*args), check=check, timeout=timeout)

    def popen(self, *args: str | os.PathLike[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.cmd(*args), cwd=REPO, env=ENV, **kwargs)

    def fstype(self, path: Path) -> str | None:
        """The file system type of the topmost mount exactly at ``path`` in this host."""
        found = None
        with open(f"/proc/{self.pid}/mountinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                fields = line.split()
                if fields[4].encode().decode("unicode_escape") == os.fspath(path):
                    found = fields[fields.index("-") + 1]
        return found

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (all of them started here)."""
        out = run("ip", "netns", "pids", self.ns, check=False).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        for pid in self.pids():
            if pid != self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.holder.kill()
        self.holder.wait(10)
        run("ip", "netns", "del", self.ns, check=False)


class Network:
    """A store host and compute hosts; ``close()`` removes every namespace it made."""

    def __init__(self, tag: str) -> None:
        require_tool("ip")
        require_tool("nsenter")
        self.prefix = f"scfs-{os.getpid()}-{tag}"
        self.hosts: list[Host] = []
        self.store = Host("store", f"{self.prefix}-store", 0)
        self.store_ns = self.store.ns
        run("ip", "-n", self.store_ns, "addr", "add", f"{STORE_ADDR}/32", "dev", "lo")

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        host = Host(name, f"{self.prefix}-{name}", index)
        self.hosts.append(host)
        link = f"s{index}"
        run("ip", "-n", self.store_ns, "link", "add", link, "type", "veth", "peer", "name",
            "eth0", "netns", host.ns)
        run("ip", "-n", self.store_ns, "addr", "add", f"10.213.{index}.1/30", "dev", link)
        run("ip", "-n", host.ns, "addr", "add", f"10.213.{index}.2/30", "dev", "eth0")
        run("ip", "-n", self.store_ns, "link", "set", link, "up")
        run("ip", "-n", host.ns, "link", "set", "eth0", "up")
        run("ip", "-n", host.ns, "route", "add", f"{STORE_ADDR}/32", "via", f"10.213.{index}.1")
        return host

    def sent_to(self, host: Host) -> int:
        """Bytes the store host sent over its link to ``host`` so far."""
        out = run("ip", "-n", self.store_ns, "-j", "-s", "link", "show", "dev",
                  f"s{host.index}").stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def close(self) -> None:
        for host in [*reversed(self.hosts), self.store]:
            host.close()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NsMount(Mount):
    """scachefs running in a host: started, watched and unmounted through its namespaces."""

    def __init__(self, host: Host, source: Path, mountpoint: Path, options: list[str],
                 log_path: Path, allow: tuple[str, ...] = ()) -> None:
        self.host = host
        super().__init__(source, mountpoint, options, log_path, allow=allow,
                         wrapper=tuple(host.cmd()))

    def _wait_live(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"scachefs exited with {self.proc.returncode}:\n{self.log()}")
            if "mount is live" in self.log():
                assert self.host.fstype(self.mountpoint) == "fuse.scachefs"
                return
            time.sleep(0.05)
        raise AssertionError(f"scachefs did not come up in {timeout}s:\n{self.log()}")

    def unmount(self) -> None:
        if self.proc.poll() is None:
            self.host.run("fusermount3", "-u", self.mountpoint, timeout=30)
        try:
            code = self.proc.wait(timeout=30)
        finally:
            self._log.close()
        assert code == 0, f"scachefs exited with {code}:\n{self.log()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.host.run("fusermount3", "-uz", self.mountpoint, check=False)
        self._log.close()

    def stats(self) -> dict[str, Any]:
        out = self.host.run(sys.executable, "-c",
                            "import os, sys; sys.stdout.write(os.getxattr(sys.argv[1], "
                            "'user.scachefs.stats').decode())", self.mountpoint).stdout
        doc: dict[str, Any] = json.loads(out)
        return doc

    def layer(self, path: str) -> dict[str, Any]:
        for layer in self.stats()["layers"]:
            if layer["path"] == path:
                return dict(layer)
        raise AssertionError(f"no layer {path} in the stats of {self.mountpoint}")


class SshStore:
    """sshd in the store host serving ``root`` over SFTP; compute hosts mount it with sshfs."""

    def __init__(self, net: Network, root: Path, work: Path) -> None:
        for tool in ("sshfs", "ssh-keygen"):
            require_tool(tool)
        assert Path("/usr/sbin/sshd").exists(), "openssh-server is not installed: run make test"
        self.net, self.root, self.work = net, root, work
        work.mkdir(parents=True, exist_ok=True)
        self.key = work / "client_key"
        host_key = work / "host_key"
        for path in (self.key, host_key):
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "scachefs-test", "-f", path)
        authorized = work / "authorized_keys"
        authorized.write_text(Path(f"{self.key}.pub").read_text())
        config = work / "sshd_config"
        config.write_text(
            f"ListenAddress {STORE_ADDR}:22\nHostKey {host_key}\nPidFile {work}/sshd.pid\n"
            f"AuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nSubsystem sftp /usr/lib/openssh/sftp-server\nLogLevel INFO\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self.log_path = work / "sshd.log"
        self._log = open(self.log_path, "ab")
        self.proc = net.store.popen("/usr/sbin/sshd", "-D", "-e", "-f", config,
                                    stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while "Server listening" not in self.log_path.read_text(errors="replace"):
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                self.log_path.read_text(errors="replace")
            time.sleep(0.05)

    def mount(self, host: Host, mountpoint: Path) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        host.run("sshfs", f"root@{STORE_ADDR}:{self.root}", mountpoint, "-o",
                 f"IdentityFile={self.key},StrictHostKeyChecking=no,"
                 "UserKnownHostsFile=/dev/null,BatchMode=yes,LogLevel=ERROR", timeout=30)
        assert host.fstype(mountpoint) == "fuse.sshfs"

    def unmount(self, host: Host, mountpoint: Path) -> None:
        host.run("fusermount3", "-u", mountpoint, check=False, timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._log.close()


class GlusterStore:
    """glusterd started by hand in the store host, one single-brick volume of ``brick``."""

    VOLUME = "scstore"

    def __init__(self, net: Network, brick: Path, work: Path) -> None:
        for tool in ("glusterd", "gluster", "mount.glusterfs"):
            require_tool(tool)
        self.net, self.brick, self.work = net, brick, work
        work.mkdir(parents=True, exist_ok=True)
        state, rundir = work / "state", work / "run"
        state.mkdir(exist_ok=True)
        rundir.mkdir(exist_ok=True)
        self.sock = rundir / "glusterd.socket"
        volfile = work / "glusterd.vol"
        volfile.write_text(
            "volume management\n    type mgmt/glusterd\n"
            f"    option working-directory {state}\n    option run-directory {rundir}\n"
            f"    option glusterd-sockfile {self.sock}\n    option transport-type socket\n"
            "    option transport.socket.listen-port 24007\n    option ping-timeout 0\n"
            "    option event-threads 1\n    option max-port 60999\nend-volume\n")
        self.log_path = work / "glusterd.log"
        self.proc = net.store.popen("glusterd", "-N", "-f", volfile, "-p", work / "glusterd.pid",
                                    "-l", self.log_path, "--log-level=WARNING",
                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while self.cli("volume", "list", check=False).returncode != 0:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.logs()
            time.sleep(0.2)
        brick.mkdir(parents=True, exist_ok=True)
        # force: the brick is on the root file system
        self.cli("volume", "create", self.VOLUME, f"{STORE_ADDR}:{brick}", "force")
        self.cli("volume", "start", self.VOLUME)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.net.store.run("gluster", f"--glusterd-sock={self.sock}", "--mode=script",
                                  *args, check=check, timeout=60)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def mount(self, host: Host, mountpoint: Path) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        log = self.work / f"client-{host.name}.log"
        host.run("mount", "-t", "glusterfs", "-o", f"log-file={log},log-level=WARNING",
                 f"{STORE_ADDR}:/{self.VOLUME}", mountpoint, timeout=60)
        assert host.fstype(mountpoint) == "fuse.glusterfs"

    def unmount(self, host: Host, mountpoint: Path) -> None:
        host.run("umount", mountpoint, check=False, timeout=30)

    def serving_pids(self) -> list[int]:
        """glusterd and the brick process (glusterfsd)."""
        return [p for p in self.net.store.pids() if p != self.net.store.pid]

    def close(self) -> None:
        self.cli("volume", "stop", self.VOLUME, "force", check=False)
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        for pid in self.serving_pids():  # the brick process glusterd started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        # The brick process logs under /var/log/glusterfs whatever its options say.
        brick_log = Path("/var/log/glusterfs/bricks") / (
            os.fspath(self.brick).strip("/").replace("/", "-") + ".log")
        brick_log.unlink(missing_ok=True)
