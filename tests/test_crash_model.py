"""The crash model: random metadata and data operations against a model of the tree, while
the daemon is SIGKILLed at random moments and at chosen points (issue 18 item 6).

A client applies create (O_EXCL), write, truncate, mkdir, rmdir, unlink, rename, link,
symlink, chmod and setxattr through an ``allow_other`` mount, each checked against what
the model says the store must answer; long-held descriptors are re-read against the model
all along. Meanwhile the daemon dies: at random moments (SIGKILL from outside) and at
chosen points inside it (``scachefs.crashpoints``: right before and after a state journal
write, in the middle of a compaction). At the end the tree through the mount and on the
store must both be the model. Every client error is counted by errno; the only ones
expected are the model's own (EEXIST for a name that exists, ...): a resent
non-idempotent request that the dead daemon had already done must be answered as done
(scachefs/resend.py), never EEXIST or ENOENT.

``make soak`` runs it longer (SCACHEFS_SOAK_SECONDS).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.mounting import Mount
from tests.test_restart import wait_generation
from tests.test_shadow_cache import stats

SECONDS = float(os.environ.get("SCACHEFS_SOAK_SECONDS") or 20)
DIRS = ["", "d0", "d1", "d2"]
# Crash points for generations 0, 1, 2, ... (empty: only the random kills).
CRASH_AT = "journal-before:40,,journal-after:60,,compact:1,,journal-before:90"


@dataclass(eq=False)
class Node:
    """A regular file of the model (hard links share one)."""

    data: bytearray = field(default_factory=bytearray)
    mode: int = 0o644
    xattr: bytes | None = None


@dataclass
class Model:
    files: dict[str, Node] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # symlink name -> target
    dirs: set[str] = field(default_factory=lambda: {"d0"})

    def exists(self, name: str) -> bool:
        return name in self.files or name in self.links or name in self.dirs

    def empty(self, d: str) -> bool:
        prefix = d + "/"
        return not any(n.startswith(prefix) for n in (*self.files, *self.links, *self.dirs))


class Client:
    def __init__(self, mnt: Path, seed: int) -> None:
        self.mnt = mnt
        self.rnd = random.Random(seed)
        self.model = Model()
        self.errors: Counter[str] = Counter()
        self.resent: Counter[str] = Counter()
        self.ops = 0
        self.held: list[tuple[int, Node]] = []
        self.problems: list[str] = []
        self.creates_resent = 0
        self.last = ""

    def path(self, name: str) -> Path:
        return self.mnt / name

    def new_name(self) -> str:
        parent = self.rnd.choice([d for d in DIRS if d == "" or d in self.model.dirs])
        leaf = f"n{self.rnd.randrange(40)}"
        return f"{parent}/{leaf}" if parent else leaf

    def some(self, names: list[str]) -> str | None:
        return self.rnd.choice(names) if names else None

    # ------------------------------------------------------------------ ops
    def step(self) -> None:
        m = self.model
        op = self.rnd.choice(["create", "create", "write", "write", "truncate", "mkdir",
                              "rmdir", "unlink", "rename", "link", "symlink", "chmod",
                              "setxattr", "reread"])
        self.ops += 1
        if op == "create":
            name = self.new_name()
            data = self.rnd.randbytes(self.rnd.randrange(1, 9000))
            expect = errno.EEXIST if m.exists(name) else 0

            def do() -> None:
                fd = os.open(self.path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
                try:
                    os.write(fd, data)
                    if self.rnd.random() < 0.2 and len(self.held) < 6:
                        self.held.append((os.dup(fd), node))
                finally:
                    os.close(fd)
            node = Node(bytearray(data), 0o640)
            if self.run("create", do, expect, lambda: self.is_file(name)):
                if self.resent["create"] > self.creates_resent:  # created, never written
                    self.creates_resent = self.resent["create"]
                    node.data = bytearray()
                m.files[name] = node
        elif op == "write":
            name = self.some(sorted(m.files))
            if name is None:
                return
            node = m.files[name]
            at = self.rnd.randrange(0, len(node.data) + 100)
            data = self.rnd.randbytes(self.rnd.randrange(1, 5000))

            def do() -> None:
                fd = os.open(self.path(name), os.O_WRONLY)
                try:
                    assert os.pwrite(fd, data, at) == len(data)
                finally:
                    os.close(fd)
            if self.run("write", do, 0, None):
                if at > len(node.data):
                    node.data.extend(bytes(at - len(node.data)))
                node.data[at:at + len(data)] = data
        elif op == "truncate":
            name = self.some(sorted(m.files))
            if name is None:
                return
            node = m.files[name]
            size = self.rnd.randrange(0, len(node.data) + 3000)
            if self.run("truncate", lambda: os.truncate(self.path(name), size), 0, None):
                del node.data[size:]
                node.data.extend(bytes(size - len(node.data)))
        elif op == "mkdir":
            name = self.rnd.choice(DIRS[1:])
            expect = errno.EEXIST if m.exists(name) else 0
            if self.run("mkdir", lambda: os.mkdir(self.path(name), 0o755), expect,
                        lambda: self.path(name).is_dir()):
                m.dirs.add(name)
        elif op == "rmdir":
            name = self.some(sorted(d for d in m.dirs if m.empty(d)))
            if name is None:
                return
            if self.run("rmdir", lambda: os.rmdir(self.path(name)), 0,
                        lambda: not os.path.lexists(self.path(name))):
                m.dirs.discard(name)
        elif op == "unlink":
            name = self.some(sorted([*m.files, *m.links]))
            if name is None:
                return
            if self.run("unlink", lambda: os.unlink(self.path(name)), 0,
                        lambda: not os.path.lexists(self.path(name))):
                m.files.pop(name, None)
                m.links.pop(name, None)
        elif op == "rename":
            src = self.some(sorted(m.files))
            if src is None:
                return
            dst = self.new_name()
            if dst in m.dirs or dst in m.links or dst == src:
                return
            node = m.files[src]
            if m.files.get(dst) is node:
                return  # two links of one file: rename(2) does nothing, a resend can't tell
            if self.run("rename", lambda: os.rename(self.path(src), self.path(dst)), 0,
                        lambda: not os.path.lexists(self.path(src)) and self.is_file(dst)):
                del m.files[src]
                m.files[dst] = node
        elif op == "link":
            src = self.some(sorted(m.files))
            if src is None:
                return
            dst = self.new_name()
            expect = errno.EEXIST if m.exists(dst) else 0
            if self.run("link", lambda: os.link(self.path(src), self.path(dst)), expect,
                        lambda: self.is_file(dst)):
                m.files[dst] = m.files[src]
        elif op == "symlink":
            dst = self.new_name()
            target = f"target-{self.rnd.randrange(1000)}"
            expect = errno.EEXIST if m.exists(dst) else 0
            self.last = dst
            if self.run("symlink", lambda: os.symlink(target, self.path(dst)), expect,
                        lambda: os.path.islink(self.path(dst))
                        and os.readlink(self.path(dst)) == target):
                m.links[dst] = target
        elif op == "chmod":
            name = self.some(sorted(m.files))
            if name is None:
                return
            mode = self.rnd.choice([0o600, 0o640, 0o644, 0o444, 0o755])
            if self.run("chmod", lambda: os.chmod(self.path(name), mode), 0, None):
                m.files[name].mode = mode
        elif op == "setxattr":
            name = self.some(sorted(m.files))
            if name is None:
                return
            value = self.rnd.randbytes(16)
            if self.run("setxattr", lambda: os.setxattr(self.path(name), "user.model", value),
                        0, None):
                m.files[name].xattr = value
        else:
            self.reread()

    def is_file(self, name: str) -> bool:
        return os.path.isfile(self.path(name)) and not os.path.islink(self.path(name))

    def run(self, op: str, fn: object, expect: int, done: object) -> bool:
        """Do one operation; True if the model must now show it done."""
        try:
            fn()  # type: ignore[operator]
            got = 0
        except OSError as exc:
            got = exc.errno or -1
        if got:
            self.errors[f"{op} {errno.errorcode.get(got, got)}"] += 1
        if got == expect:
            return expect == 0
        resend = {"create": errno.EEXIST, "mkdir": errno.EEXIST, "link": errno.EEXIST,
                  "symlink": errno.EEXIST, "unlink": errno.ENOENT, "rmdir": errno.ENOENT,
                  "rename": errno.ENOENT}
        if expect == 0 and got == resend.get(op) and done is not None and done():  # type: ignore[operator]
            self.resent[op] += 1  # the dead daemon did it; its successor answered the resend
            return True
        self.problems.append(f"{op}: expected {errno.errorcode.get(expect, expect)}, got "
                             f"{errno.errorcode.get(got, got)} (op {self.ops}) "
                             f"{self.last!r}: {self.describe(self.last)}")
        return False

    def describe(self, name: str) -> str:
        try:
            st = os.lstat(self.path(name))
        except OSError as exc:
            return f"lstat: {exc.strerror}"
        kind = stat.filemode(st.st_mode)
        target = os.readlink(self.path(name)) if stat.S_ISLNK(st.st_mode) else ""
        in_model = ("file" if name in self.model.files else "link" if name in self.model.links
                    else "dir" if name in self.model.dirs else "none")
        return f"{kind} {target} (model: {in_model})"

    def reread(self) -> None:
        for fd, node in self.held:
            try:
                size = os.fstat(fd).st_size
                got = os.pread(fd, size + 1, 0)
            except OSError as exc:
                self.errors[f"reread {errno.errorcode.get(exc.errno or 0, exc.errno)}"] += 1
                self.problems.append(f"reread of a held descriptor: {exc}")
                continue
            if got != bytes(node.data):
                self.problems.append(f"a held descriptor reads {len(got)} bytes that are not "
                                     f"the model's {len(node.data)}")


def tree(root: Path) -> dict[str, tuple[str, object, int, bytes | None]]:
    """name -> (kind, content or target, permission bits, user.model xattr)."""
    out: dict[str, tuple[str, object, int, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir.startswith(".scache"):
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if d != ".scache"]
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path), 0, None)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None, 0, None)
            else:
                try:
                    xattr: bytes | None = os.getxattr(path, "user.model")
                except OSError:
                    xattr = None
                out[rel] = ("file", Path(path).read_bytes(), stat.S_IMODE(st.st_mode), xattr)
    return out


def model_tree(m: Model) -> dict[str, tuple[str, object, int, bytes | None]]:
    out: dict[str, tuple[str, object, int, bytes | None]] = {}
    for d in m.dirs:
        out[d] = ("dir", None, 0, None)
    for name, target in m.links.items():
        out[name] = ("link", target, 0, None)
    for name, node in m.files.items():
        out[name] = ("file", bytes(node.data), node.mode, node.xattr)
    return out


def test_random_operations_through_kills_at_random_moments_and_chosen_points(
        store: Path, mnt: Path, mount_factory: MountFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCACHEFS_CRASH_AT", CRASH_AT)
    monkeypatch.setenv("SCACHEFS_COMPACT_AT", str(32 << 10))  # compactions happen here
    (store / "d0").mkdir()
    mount: Mount = mount_factory(store, mnt, "allow_other")
    client = Client(mnt, seed=1)
    stop = threading.Event()
    kills: list[float] = []

    def killer() -> None:
        """SIGKILLs the daemons of odd generations at random moments; those of even ones
        die at their chosen point (CRASH_AT) by themselves."""
        rnd = random.Random(2)
        while not stop.wait(rnd.uniform(0.5, 2.0)):
            try:
                doc = stats(mnt)
                if doc["generation"] % 2 == 1:
                    os.kill(int(doc["pid"]), signal.SIGKILL)
                    kills.append(time.monotonic())
            except OSError:
                pass  # between daemons: the next one is coming

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline:
            client.step()
    finally:
        stop.set()
        thread.join(30)
    client.reread()
    doc = wait_generation(mount, 1)
    generations = int(doc["generation"])
    for fd, _ in client.held:
        os.close(fd)
    print(f"crash model: {client.ops} operations, {generations} daemon deaths "
          f"({len(kills)} random SIGKILLs, the rest at chosen points), errors by errno: "
          f"{dict(client.errors)}, resent requests answered as already done: "
          f"{dict(client.resent)}")
    assert client.problems == [], client.problems[:20]
    # A resent request the dead daemon had done is answered as done (resend.py): the
    # client never sees the EEXIST or ENOENT of doing it twice.
    assert client.resent == {}, client.resent
    want = model_tree(client.model)
    assert tree(store) == want
    assert tree(mnt) == want
    assert generations - len(kills) >= 4, (generations, len(kills))  # chosen points fired
    assert generations >= 7, generations
