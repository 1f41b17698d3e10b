"""The threat model of docs/security.md, claim by claim, with allow_other and a real local user.

Who is trusted: root and the mount's owner. What is tested here is everything else: an
unprivileged local user on a mount with allow_other, and the store's content (image
headers, symlinks, names) as something the daemon must never trust.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import stat
import time
from pathlib import Path

import pytest

from scachefs.traces import decode as traces_decode
from tests import test_permissions
from tests.conftest import MountFactory
from tests.mounting import Mount, daemon_fd_targets, run
from tests.test_boot_traces import (
    boot_script,
    make_boot_base,
    replay_args,
    trace_file_name,
    wait_for,
)
from tests.test_permissions import USER
from tests.test_qemu_passthrough import make_base, qemu_io
from tests.test_shadow_cache import layer_stats, overlay, stats

USER_PY = "/usr/bin/python3"  # root's python may live where the test user cannot go
MAX_TRACE_BYTES = 16 << 20  # docs/boot-traces.md: a trace file never exceeds 16 MiB

# The unprivileged user and the world-reachable store and mount point of test_permissions.
public_dir = test_permissions.public_dir
store = test_permissions.store
mnt = test_permissions.mnt


def as_user(*cmd: str | os.PathLike[str]) -> tuple[int, str]:
    """Run a command as the test user: (exit code, stdout + stderr)."""
    result = run(*cmd, user=USER, check=False)
    return result.returncode, result.stdout + result.stderr


def user_errno(statement: str) -> str:
    """Run one Python statement as the test user: "OK" or the errno name it failed with."""
    code = ("import errno, os, sys\n"
            "try:\n"
            f"    {statement}\n"
            "except OSError as exc:\n"
            "    print(errno.errorcode[exc.errno])\n"
            "else:\n"
            "    print('OK')\n")
    return run(USER_PY, "-c", code, user=USER).stdout.strip()


def user_stats(mnt: Path) -> tuple[int, str]:
    """getfattr of the stats as the test user: (exit code, the document or the error)."""
    result = run("getfattr", "-n", "user.scachefs.stats", "--only-values", "--absolute-names",
                 mnt, user=USER, check=False)
    return result.returncode, result.stdout if result.returncode == 0 else result.stderr


def served(mnt: Path, path: str) -> int:
    layer = layer_stats(mnt, path)
    return int(layer["hit_bytes"] + layer["miss_bytes"])


def unsafe_image(path: Path, backing: str, fmt: str = "raw") -> Path:
    """A qcow2 naming `backing` verbatim, created without opening it (-u)."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, path, "1M")
    return path


# ----------------------------------------------------------------- store permissions


def test_a_cached_layer_stays_private_to_those_the_store_allows(
        store: Path, mnt: Path, mounted: Mount, user: pwd.struct_passwd) -> None:
    base = make_base(store)
    base.chmod(0o600)
    vm = overlay(store, "vm.qcow2", "base.qcow2")
    vm.chmod(0o644)
    home = store / "home"
    home.mkdir()
    os.chown(home, user.pw_uid, user.pw_gid)
    # Root boots: the base is now a cached layer, in the daemon's memory and in the
    # kernel's page cache (buffered read of the layer itself).
    qemu_io(mnt / "vm.qcow2", "read -P 0xa1 0 1M", "read -P 0xb2 8M 3M", cache="none")
    assert (mnt / "base.qcow2").read_bytes() == base.read_bytes()
    layer = layer_stats(mnt, "base.qcow2")
    assert layer["attached"] and layer["resident_bytes"] > 0
    before = served(mnt, "base.qcow2")

    for statement in (f"open({str(mnt / 'base.qcow2')!r}, 'rb').read(4096)",
                      f"os.open({str(mnt / 'base.qcow2')!r}, os.O_RDONLY | os.O_DIRECT)",
                      f"open({str(mnt / 'base.qcow2')!r}, 'r+b')"):
        assert user_errno(statement) == "EACCES", statement
    code, out = as_user("qemu-io", "-r", "--cache=none", "-c", "read 0 4k", mnt / "vm.qcow2")
    assert code != 0 and "Permission denied" in out, out
    # An overlay of the user's own, naming the private base, does not open it either.
    code, out = as_user("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
                        "../base.qcow2", "-F", "qcow2", mnt / "home" / "mine.qcow2", "64M")
    assert code == 0, out
    code, out = as_user("qemu-io", "-c", "read 0 4k", mnt / "home" / "mine.qcow2")
    assert code != 0 and "Permission denied" in out, out
    assert served(mnt, "base.qcow2") == before  # not one byte of the layer went to the user
    # The same user reads it once the store says so (through the mount: no stale attributes).
    os.chmod(mnt / "base.qcow2", 0o644)
    code, out = as_user("qemu-io", "-r", "--cache=none", "-c", "read -P 0xa1 0 1M",
                        mnt / "vm.qcow2")
    assert code == 0 and "verification failed" not in out, out


def test_a_permission_revoked_on_the_store_applies_within_attr_timeout(
        store: Path, mnt: Path, mount_factory: MountFactory,
        user: pwd.struct_passwd) -> None:
    mount_factory(store, mnt, "allow_other", "attr_timeout=1", "entry_timeout=1")
    (store / "doc").write_bytes(b"was public")
    (store / "doc").chmod(0o644)
    statement = f"open({str(mnt / 'doc')!r}, 'rb').read()"
    assert user_errno(statement) == "OK"
    (store / "doc").chmod(0o600)  # directly on the store, behind the kernel's attribute cache
    time.sleep(1.5)
    assert user_errno(statement) == "EACCES"
    (store / "doc2").write_bytes(b"public")
    assert user_errno(f"open({str(mnt / 'doc2')!r}, 'rb').read()") == "OK"
    os.chmod(mnt / "doc2", 0o600)  # through the mount: at once
    assert user_errno(f"open({str(mnt / 'doc2')!r}, 'rb').read()") == "EACCES"


def test_setuid_files_and_device_nodes_of_the_store_give_nothing(
        store: Path, mnt: Path, mounted: Mount, user: pwd.struct_passwd) -> None:
    options = next(line.split()[3] for line in Path("/proc/mounts").read_text().splitlines()
                   if line.split()[1] == str(mnt))
    assert {"nosuid", "nodev"} <= set(options.split(",")), options
    tool = store / "id-setuid"
    tool.write_bytes(Path("/usr/bin/id").read_bytes())
    tool.chmod(0o4755)
    code, out = as_user(mnt / "id-setuid", "-u")
    assert code == 0 and out.strip() == str(user.pw_uid), out  # not 0: nosuid
    os.mknod(store / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    assert user_errno(f"open({str(mnt / 'null')!r}, 'rb')") == "EACCES"  # nodev


# ------------------------------------------------------------------- control channel


def test_control_actions_need_root_even_where_the_kernel_lets_the_user_through(
        store: Path, mnt: Path, mounted: Mount, user: pwd.struct_passwd) -> None:
    os.chmod(mnt, 0o777)  # writable root: the kernel passes user.* setxattr to the daemon
    make_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    qemu_io(mnt / "vm.qcow2", "read -P 0xa1 0 1M", cache="none")
    resident = layer_stats(mnt, "base.qcow2")["resident_bytes"]
    assert resident > 0
    for command in ('{"action": "drop"}', '{"action": "drop", "path": "base.qcow2"}',
                    '{"action": "log_level", "level": "debug"}',
                    '{"action": "warm", "path": "base.qcow2"}',
                    '{"action": "record", "path": "base.qcow2"}'):
        code, out = as_user("setfattr", "-n", "user.scachefs.command", "-v", command, mnt)
        assert code != 0 and "Operation not permitted" in out, (command, out)
    code, out = as_user("setfattr", "-n", "user.scachefs.stats", "-v", "{}", mnt)
    assert code != 0 and "Operation not permitted" in out, out
    assert layer_stats(mnt, "base.qcow2")["resident_bytes"] == resident  # nothing happened
    refused = [line for line in mounted.log().splitlines()
               if f"control request from uid {user.pw_uid} refused" in line]
    assert len(refused) == 5, mounted.log()
    assert "log level set" not in mounted.log()
    # ...but the user may read the statistics, and root may act.
    code, out = user_stats(mnt)
    assert code == 0 and json.loads(out)["schema"] == 1, out
    os.setxattr(mnt, "user.scachefs.command", b'{"action": "drop", "path": "base.qcow2"}')
    assert layer_stats(mnt, "base.qcow2")["resident_bytes"] == 0


def test_statistics_need_read_access_to_the_mount_root(
        store: Path, mnt: Path, mounted: Mount, user: pwd.struct_passwd) -> None:
    code, out = user_stats(mnt)
    assert code == 0 and json.loads(out)["schema"] == 1, out
    # A root the user may not write: the kernel refuses actions before the daemon sees them.
    code, out = as_user("setfattr", "-n", "user.scachefs.command", "-v",
                        '{"action": "drop"}', mnt)
    assert code != 0 and "Permission denied" in out, out
    os.chmod(mnt, 0o711)  # may enter, may not read
    code, out = user_stats(mnt)
    assert code != 0 and "Permission denied" in out, out
    assert stats(mnt)["schema"] == 1  # root still reads them
    os.chmod(mnt, 0o755)
    assert user_stats(mnt)[0] == 0


def test_statistics_do_not_reveal_names_the_user_cannot_see(
        store: Path, mnt: Path, mount_factory: MountFactory,
        user: pwd.struct_passwd) -> None:
    private = store / "private-vms"
    private.mkdir(mode=0o700)
    make_base(private, name="customer-x-base.qcow2")
    overlay(private, "customer-x-vm.qcow2", "customer-x-base.qcow2")
    mount_factory(store, mnt, "allow_other")
    qemu_io(mnt / "private-vms" / "customer-x-vm.qcow2", "read -P 0xa1 0 64k")
    assert user_errno(f"os.listdir({str(mnt / 'private-vms')!r})") == "EACCES"
    code, out = user_stats(mnt)
    assert code == 0
    assert "customer-x" not in out, json.loads(out)["layers"]


# ------------------------------------------------------------------------ .scache


def test_the_trace_directory_is_hidden_and_reserved(
        store: Path, mnt: Path, mount_factory: MountFactory,
        user: pwd.struct_passwd) -> None:
    store.chmod(0o777)  # a root the user may write: what stops them is the daemon
    make_boot_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    (store / "peek").symlink_to(".scache/traces")
    mount = mount_factory(store, mnt, "allow_other")
    run(*replay_args(mnt / "vm.qcow2", boot_script(think_ms=0)))
    wait_for(mnt, "base.qcow2", lambda la: la["trace"]["status"] == "ready")
    traces = store / ".scache" / "traces"
    (trace,) = traces.iterdir()
    before = {p.name: p.read_bytes() for p in traces.iterdir()}
    hidden = mnt / ".scache"

    code, out = as_user("ls", "-a", mnt)
    assert code == 0 and ".scache" not in out.split() and "base.qcow2" in out.split(), out
    for statement in (f"os.stat({str(hidden)!r})",
                      f"os.lstat({str(hidden / 'traces')!r})",
                      f"open({str(hidden / 'traces' / trace.name)!r}, 'rb')",
                      f"open({str(hidden / 'traces' / 'evil.trace')!r}, 'wb')",
                      f"os.listdir({str(mnt / 'peek')!r})",
                      f"open({str(mnt / 'peek' / trace.name)!r}, 'rb')",
                      f"os.unlink({str(hidden)!r})",
                      f"os.rmdir({str(hidden)!r})",
                      f"os.rename({str(hidden)!r}, {str(mnt / 'taken')!r})"):
        assert user_errno(statement) == "ENOENT", statement
    own = mnt / "mine"
    assert user_errno(f"open({str(own)!r}, 'wb').close()") == "OK"
    for statement in (f"os.mkdir({str(hidden)!r})",
                      f"open({str(hidden)!r}, 'wb')",
                      f"os.mkfifo({str(hidden)!r})",
                      f"os.symlink('/tmp', {str(hidden)!r})",
                      f"os.link({str(own)!r}, {str(hidden)!r})",
                      f"os.rename({str(own)!r}, {str(hidden)!r})"):
        assert user_errno(statement) == "EPERM", statement
    # Root goes through the same door.
    with pytest.raises(PermissionError):
        os.mkdir(hidden)
    with pytest.raises(FileNotFoundError):
        os.stat(hidden)
    assert {p.name: p.read_bytes() for p in traces.iterdir()} == before
    assert "boot traces disabled" not in mount.log()


def test_trace_files_are_written_by_the_daemon_only_and_bounded(
        store: Path, mnt: Path, mount_factory: MountFactory,
        user: pwd.struct_passwd) -> None:
    make_boot_base(store).chmod(0o644)
    home = store / "home"
    home.mkdir()
    os.chown(home, user.pw_uid, user.pw_gid)
    mount = mount_factory(store, mnt, "allow_other", "record=on", "host_id=h1")
    code, out = as_user("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base.qcow2",
                        "-F", "qcow2", mnt / "home" / "vm.qcow2")
    assert code == 0, out
    traces = store / ".scache" / "traces"
    trace = traces / trace_file_name(store / "base.qcow2", "h1")
    for n in range(1, 11):  # more boots than the 8 a file keeps
        code, out = as_user(*replay_args(mnt / "home" / "vm.qcow2",
                                         boot_script(seed=n, think_ms=0)))
        assert code == 0 and "verification failed" not in out, out
        deadline = time.monotonic() + 20
        while mount.log().count("recorded a boot of base.qcow2") < n:
            assert time.monotonic() < deadline, mount.log()
            time.sleep(0.1)
    assert len(traces_decode(trace.read_bytes()).boots) == 8
    traces = store / ".scache" / "traces"
    for directory in (store / ".scache", traces):
        st = directory.lstat()
        assert stat.S_ISDIR(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    files = list(traces.iterdir())
    assert files == [trace]
    st = files[0].lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644
    assert 0 < st.st_size <= MAX_TRACE_BYTES
    # The user writes neither through the mount nor on the store itself.
    assert user_errno(f"open({str(mnt / '.scache' / 'traces' / 'x.trace')!r}, 'wb')") == "ENOENT"
    assert user_errno(f"open({str(traces / 'x.trace')!r}, 'wb')") == "EACCES"
    assert user_errno(f"open({str(files[0])!r}, 'r+b')") == "EACCES"


def test_trace_files_never_follow_symlinks(
        store: Path, mnt: Path, public_dir: Path, mount_factory: MountFactory) -> None:
    base = make_boot_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    victim = public_dir / "victim"
    victim.write_bytes(b"untouched")
    traces = store / ".scache" / "traces"
    traces.mkdir(parents=True)
    final = traces / trace_file_name(base, "h1")
    final.symlink_to(victim)
    mount = mount_factory(store, mnt, "allow_other", "host_id=h1",
                          allow=("could not save the boot trace",))
    # The temporary name carries the host id and the daemon's pid: plant it too.
    (traces / f".{final.name}.h1.{mount.pid}.tmp").symlink_to(victim)
    run(*replay_args(mnt / "vm.qcow2", boot_script(think_ms=0)))
    deadline = time.monotonic() + 20
    while "could not save the boot trace" not in mount.log():
        assert time.monotonic() < deadline, mount.log()
        time.sleep(0.1)
    assert victim.read_bytes() == b"untouched"
    mount.unmount()
    # With the temporary name free (a new daemon, a new pid), the symlink at the final name
    # is replaced by the trace, never followed.
    mount_factory(store, mnt, "allow_other", "host_id=h1")
    run(*replay_args(mnt / "vm.qcow2", boot_script(think_ms=0)))
    wait_for(mnt, "base.qcow2", lambda la: la["trace"]["status"] == "ready")
    assert victim.read_bytes() == b"untouched"
    assert stat.S_ISREG(final.lstat().st_mode)
    assert traces_decode(final.read_bytes()).host == "h1"


def test_a_failed_trace_save_does_not_stop_recording(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    base = make_boot_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    traces = store / ".scache" / "traces"
    traces.mkdir(parents=True)
    mount = mount_factory(store, mnt, "allow_other", "host_id=h1",
                          allow=("could not save the boot trace",))
    blocker = traces / f".{trace_file_name(base, 'h1')}.h1.{mount.pid}.tmp"
    blocker.mkdir()  # the store refuses this one save (EISDIR)
    run(*replay_args(mnt / "vm.qcow2", boot_script(think_ms=0)))
    deadline = time.monotonic() + 20
    while "could not save the boot trace" not in mount.log():
        assert time.monotonic() < deadline, mount.log()
        time.sleep(0.1)
    blocker.rmdir()
    run(*replay_args(mnt / "vm.qcow2", boot_script(seed=8, think_ms=0)))
    time.sleep(1.5)
    layer = layer_stats(mnt, "base.qcow2")
    assert layer["trace"]["status"] == "ready", layer["trace"]
    assert (traces / trace_file_name(base, "h1")).exists()


def test_a_trace_directory_that_is_a_symlink_is_refused(
        store: Path, mnt: Path, public_dir: Path, mount_factory: MountFactory) -> None:
    elsewhere = public_dir / "elsewhere"
    (elsewhere / "traces").mkdir(parents=True)
    (store / ".scache").symlink_to(elsewhere)
    make_boot_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    mount = mount_factory(store, mnt, "allow_other")
    assert "boot traces disabled" in mount.log()
    run(*replay_args(mnt / "vm.qcow2", boot_script(think_ms=0)))
    time.sleep(1.5)
    assert list((elsewhere / "traces").iterdir()) == []


def test_a_trace_directory_owned_by_a_user_is_not_trusted(
        store: Path, mnt: Path, mount_factory: MountFactory,
        user: pwd.struct_passwd) -> None:
    store.chmod(0o1777)  # a shared store root, like /tmp: users may create names in it
    code, out = as_user("mkdir", "-p", store / ".scache" / "traces")
    assert code == 0, out
    make_boot_base(store)
    overlay(store, "vm.qcow2", "base.qcow2")
    mount = mount_factory(store, mnt, "allow_other")
    run(*replay_args(mnt / "vm.qcow2", boot_script(think_ms=0)))
    time.sleep(1.5)
    written = list((store / ".scache" / "traces").iterdir())
    assert written == [] and "boot traces disabled" in mount.log(), written


# -------------------------------------------------------------------------- symlinks


def test_symlinks_resolve_in_the_callers_namespace_with_the_callers_rights(
        store: Path, public_dir: Path, mount_factory: MountFactory,
        user: pwd.struct_passwd) -> None:
    # The mount point is one level deeper than the store, so a relative link that climbs
    # out lands on different files depending on who resolves it.
    mnt = public_dir / "deeper" / "mnt"
    mnt.mkdir(parents=True)
    (public_dir / "marker").write_text("beside the store")
    (public_dir / "deeper" / "marker").write_text("beside the mount point")
    (store / "climb").symlink_to("../marker")
    (store / "shadow").symlink_to("/etc/shadow")
    mount = mount_factory(store, mnt, "allow_other")
    assert os.readlink(mnt / "shadow") == "/etc/shadow"
    assert os.readlink(mnt / "climb") == "../marker"
    assert (mnt / "climb").read_text() == "beside the mount point"  # the kernel followed it
    code, out = as_user("readlink", mnt / "shadow")
    assert code == 0 and out.strip() == "/etc/shadow"
    assert user_errno(f"open({str(mnt / 'shadow')!r}, 'rb')") == "EACCES"
    assert user_errno(f"os.open({str(mnt / 'shadow')!r}, os.O_RDONLY | os.O_NOFOLLOW)") \
        == "ELOOP"
    assert (mnt / "shadow").read_bytes() == Path("/etc/shadow").read_bytes()  # root's rights
    assert "/etc/shadow" not in set(daemon_fd_targets(mount.pid).values())


def test_backing_names_that_leave_the_store_are_never_cached(
        store: Path, mnt: Path, public_dir: Path, mount_factory: MountFactory,
        user: pwd.struct_passwd) -> None:
    outside = public_dir / "outside.raw"
    outside.write_bytes(b"\x5a" * (1 << 20))
    (store / "abs-link.raw").symlink_to("/etc/shadow")
    (store / "rel-link.raw").symlink_to("../outside.raw")
    (store / "sub").mkdir()
    escaping = {
        "via-abs-symlink.qcow2": "abs-link.raw",
        "via-rel-symlink.qcow2": "rel-link.raw",
        "dotdot.qcow2": "../../etc/shadow",
        "dotdot-sub.qcow2": "sub/../../outside.raw",
        "absolute.qcow2": "/etc/shadow",
        "absolute-outside.qcow2": str(outside),
    }
    for name, backing in escaping.items():
        unsafe_image(store / name, backing)
    mount = mount_factory(store, mnt, "allow_other")
    for name in escaping:  # opened as plain files, as root and as the user
        assert (mnt / name).read_bytes() == (store / name).read_bytes()
        assert as_user("cat", mnt / name)[0] == 0
    # Root's qemu follows the names itself, with root's rights; the daemon caches nothing.
    qemu_io(mnt / "via-rel-symlink.qcow2", "read -P 0x5a 0 64k", cache="none")
    qemu_io(mnt / "absolute-outside.qcow2", "read -P 0x5a 0 64k")
    code, out = as_user("qemu-io", "-r", "-c", "read 0 4k", mnt / "via-abs-symlink.qcow2")
    assert code != 0 and "Permission denied" in out, out
    doc = stats(mnt)
    assert doc["layers"] == [], doc["layers"]
    assert doc["shadow"]["problems"] >= len(escaping)
    log = mount.log()
    for name, backing in escaping.items():
        lines = [line for line in log.splitlines()
                 if f"{name}: backing file {backing}" in line and "outside the store" in line]
        assert len(lines) == 1, (name, log)
    assert not {"/etc/shadow", str(outside)} & set(daemon_fd_targets(mount.pid).values())


def test_a_backing_file_at_the_mount_point_itself_is_a_plain_file(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    names = {"mountpoint.qcow2": str(mnt), "mountpoint-slash.qcow2": f"{mnt}/",
             "mountpoint-dot.qcow2": f"{mnt}/.", "source.qcow2": str(store)}
    for name, backing in names.items():
        unsafe_image(store / name, backing, fmt="qcow2")
    mount = mount_factory(store, mnt, "allow_other")
    for name in names:
        started = time.monotonic()
        assert (mnt / name).read_bytes() == (store / name).read_bytes()
        result = run("qemu-img", "info", "--backing-chain", mnt / name, check=False,
                     timeout=30)
        assert result.returncode != 0  # qemu cannot open a directory as an image
        assert time.monotonic() - started < 10, name
    assert stats(mnt)["layers"] == []
    log = mount.log()
    for name in names:
        assert len([line for line in log.splitlines()
                    if f"{name}: backing file" in line
                    and "serving it as a plain file" in line]) == 1, (name, log)
    assert f"mountpoint.qcow2: backing file {mnt} is outside the store" in log


def test_the_daemon_never_executes_names_from_the_store(
        store: Path, mnt: Path, public_dir: Path, mount_factory: MountFactory) -> None:
    pwned = public_dir / "pwned"
    names = {"subst.qcow2": f"$(touch {pwned})", "backtick.qcow2": f"`touch {pwned}`",
             "semicolon.qcow2": f"x; touch {pwned}", "pipe.qcow2": f"|touch {pwned}",
             "json.qcow2": '{"driver": "file", "filename": "/etc/shadow"}',
             "protocol.qcow2": "nbd+unix:///x?socket=/run/evil.sock"}
    names["json.qcow2"] = "json:" + names["json.qcow2"]
    for name, backing in names.items():
        unsafe_image(store / name, backing)
    mount = mount_factory(store, mnt, "allow_other")
    for name in names:
        assert (mnt / name).read_bytes() == (store / name).read_bytes()
    assert not pwned.exists()
    assert stats(mnt)["layers"] == []
    log = mount.log()
    for name in names:
        assert f"{name}: backing file" in log, (name, log)


def test_malformed_headers_never_hurt_the_daemon(
        store: Path, mnt: Path, mount_factory: MountFactory) -> None:
    make_base(store)
    template = unsafe_image(store / "template", "base.qcow2", fmt="qcow2")
    good = template.read_bytes()[:65536]
    rng = random.Random(20261124)
    for i in range(80):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):  # flip bytes of the header, extensions and name
            data[rng.randrange(0, 512)] = rng.randrange(256)
        if i % 4 == 0:
            data = data[:rng.randrange(4, 600)]  # truncated
        (store / f"fuzz{i:02}.qcow2").write_bytes(bytes(data))
    mount = mount_factory(store, mnt, "allow_other")
    for i in range(80):
        name = f"fuzz{i:02}.qcow2"
        assert (mnt / name).read_bytes() == (store / name).read_bytes(), name
        run("qemu-img", "info", mnt / name, check=False, timeout=30)
    doc = stats(mnt)
    assert doc["shadow"]["problems"] > 0
    assert mount.proc.poll() is None
    assert "Traceback" not in mount.log() and "internal error" not in mount.log()

