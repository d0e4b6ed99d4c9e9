"""A hostile local user, for tests and race trials.

``Attacker`` is a real process that drops to another uid (nobody) and, while deltavault
works in a tree, keeps swapping the entries it can write for symlinks pointing outside,
moving directories away, and planting symlinks and hard links. It also watches every
directory it may read with inotify and swaps each new entry for such a symlink the moment
it appears, as a real attacker racing a privileged writer would. ``Outside`` is a set of
private objects outside that tree (a root-only file, a directory, a FIFO, a device node,
a file with xattrs and an ACL) and a record of their state, to prove afterwards that the
attack reached none of them: same mode, owner, link count, ctime, content and xattrs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deltavault.testing.inotify import Watcher

NOBODY = 65534
State = dict[str, tuple[object, ...]]


@dataclass
class Outside:
    """Root-owned objects outside the tree under attack."""

    root: Path
    targets: list[Path] = field(default_factory=list)  # what the attacker's symlinks point at

    @classmethod
    def create(cls, root: Path) -> Outside:
        root.mkdir(mode=0o755, parents=True)
        secret = root / "secret"
        secret.write_bytes(b"root only\n")
        secret.chmod(0o600)
        d = root / "private"
        d.mkdir(mode=0o700)
        (d / "inner").write_bytes(b"inner\n")
        os.mkfifo(root / "fifo", 0o600)
        os.mknod(root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        tagged = root / "tagged"
        tagged.write_bytes(b"xattrs\n")
        tagged.chmod(0o640)
        with contextlib.suppress(OSError):
            os.setxattr(tagged, b"user.mark", b"outside")
        with contextlib.suppress(OSError):
            os.setxattr(tagged, b"trusted.mark", b"outside")
        # An ACL the attack might try to overwrite (user::rw-, group::r--, other::---).
        with contextlib.suppress(OSError):
            os.setxattr(tagged, b"system.posix_acl_access", posix_acl((0x01, 6), (0x04, 4), (0x20, 0)))
        return cls(root, [secret, d, root / "fifo", root / "null", tagged, root])

    def state(self) -> State:
        """Everything an attack could change, for every entry under ``root`` (and root)."""
        out: State = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in [".", *dirnames, *filenames]:
                p = os.path.normpath(os.path.join(dirpath, name))
                st = os.lstat(p)
                content: object = None
                if stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        content = hashlib.sha256(f.read()).hexdigest()
                elif stat.S_ISDIR(st.st_mode):
                    content = tuple(sorted(os.listdir(p)))
                try:
                    xattrs = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                                          for n in os.listxattr(p, follow_symlinks=False)))
                except OSError:
                    xattrs = ()
                out[p] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size, st.st_mtime_ns,
                          st.st_ctime_ns, st.st_rdev, content, xattrs)
        return out

    def changes(self, before: State) -> list[str]:
        """What differs from ``before``: an empty list means nothing outside was touched."""
        after = self.state()
        out = [f"{p}: gone" for p in before if p not in after]
        out += [f"{p}: new" for p in after if p not in before]
        out += [f"{p}: {before[p]} -> {after[p]}" for p in before if p in after and before[p] != after[p]]
        return out


def posix_acl(*entries: tuple[int, int], user: int | None = None) -> bytes:
    """A ``system.posix_acl_access`` value (version 2): (tag, perm) entries; with ``user``, a
    named-user entry (tag 0x02) for that uid, read-write, and the mask it needs."""
    ids = {0x02: user if user is not None else 0xFFFFFFFF}
    items = list(entries)
    if user is not None:
        items += [(0x02, 6), (0x10, 6)]
    items.sort()
    return b"\x02\x00\x00\x00" + b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ids.get(tag, 0xFFFFFFFF).to_bytes(4, "little")
        for tag, perm in items)


def rich_tree(src: Path, dirs: int = 12) -> None:
    """A source tree for attacks on what is made from it: directories writable by everyone
    (so a restored or synced copy is open to the attacker), each with files, a setuid file,
    hard links across directories, symlinks, FIFOs, device nodes, xattrs and an ACL."""
    src.mkdir()
    for i in range(dirs):
        d = src / f"d{i:02}" / "inner"
        d.mkdir(parents=True)
        for j in range(6):
            (d / f"f{j}").write_bytes(b"data %d %d\n" % (i, j) * (j + 1))
            (d.parent / f"g{j}").write_bytes(b"top %d %d\n" % (i, j))
        os.link(d / "f0", src / f"d{i:02}" / "hard-f0")
        os.symlink("../g0", d / "up")
        os.mkfifo(d / "fifo", 0o666)
        os.mknod(d / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        suid = d.parent / "suid"
        suid.write_bytes(b"#!/bin/sh\n")
        suid.chmod(0o4755)
        os.setxattr(d / "f1", b"user.tag", b"v%d" % i)
        os.setxattr(d / "f2", b"trusted.tag", b"t%d" % i)
        os.setxattr(d / "f3", b"system.posix_acl_access", posix_acl((0x01, 6), (0x04, 4), (0x20, 0), user=NOBODY))
        d.chmod(0o777)
        d.parent.chmod(0o777)
    src.chmod(0o777)


def mirror_names(outside: Outside) -> None:
    """Root-only files outside under the names ``rich_tree`` uses, for the attacker's
    symlinks to lead to: a write, chmod or link by name through a swapped directory then
    lands on one of them."""
    mirror = outside.root / "mirror"
    (mirror / "inner").mkdir(parents=True, mode=0o700)
    for name in ("hard-f0", "g0", "suid", "inner/f0", "inner/fifo", "inner/null"):
        (mirror / name).write_bytes(b"outside\n")
        (mirror / name).chmod(0o600)
    outside.targets += [mirror, mirror / "inner"]


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


_OWN_NAMES = (b".moved-", b"planted-", b"linked-")  # what the attacker itself makes


class Attacker:
    """Attacks ``tree`` from a forked child running as ``uid`` until ``stop()``.

    Each move picks a random entry by a random walk from the top and does one of: swap a
    directory for a symlink to an outside target (and sometimes back), replace a file or
    special file with such a symlink, plant a symlink or hard link under a new name.
    Between moves it reacts to inotify events: a new entry is swapped for a symlink to an
    outside target at once (a new directory is watched first, then sometimes swapped).
    Every failure (EACCES where the tree is not writable to it) is ignored: the attacker
    does what the permissions let it do, as a real one would.
    """

    def __init__(self, tree: Path, outside: Outside, *, seed: int, uid: int = NOBODY) -> None:
        self.tree = tree
        self.outside = outside
        self.seed = seed
        self.uid = uid
        self.pid = 0
        self._report = Path(f"/tmp/dv-attacker-{os.getpid()}-{seed}.json")
        self.moves: dict[str, int] = {}

    def start(self) -> Attacker:
        """Fork the attacker; returns once it watches the tree, so no event is missed."""
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            code = 0
            try:
                os.close(ready_r)
                os.setpgid(0, 0)  # its own group, with the reactor: stop() can end both
                _drop_privileges(self.uid)
                self._attack(ready_w)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(ready_w)
        os.read(ready_r, 1)  # empty if the child failed before it was ready
        os.close(ready_r)
        self.pid = pid
        return self

    def stop(self) -> dict[str, int]:
        """Stop the child; returns how many moves of each kind succeeded."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:  # never hang a test on the attacker
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.01)
            self.pid = 0
        self.moves = {}
        for report in (self._report, self._report.with_suffix(".react")):
            try:
                for k, v in json.loads(report.read_text()).items():
                    self.moves[k] = self.moves.get(k, 0) + v
                report.unlink()
            except (OSError, ValueError):
                pass
        return self.moves

    def __enter__(self) -> Attacker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the child
    def _attack(self, ready: int) -> None:
        """Two processes: this one makes random moves; a second one reacts to inotify
        events, so that a new entry is swapped within microseconds of its creation."""
        stopping = False

        def on_term(_s: int, _f: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, on_term)
        targets = [os.fsencode(t) for t in self.outside.targets]
        watcher = Watcher(os.fsencode(self.tree))
        # The reactor is told to stop by the end of this pipe, not by a signal: a signal sent
        # while a forked child is still in CPython's after-fork code is lost.
        stop_r, stop_w = os.pipe()
        reactor = os.fork()
        if reactor == 0:
            code = 0
            try:
                os.close(stop_w)
                self._react(watcher, targets, stop_r)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(stop_r)
        os.close(watcher.fd)
        os.write(ready, b"1")
        os.close(ready)
        rng = random.Random(self.seed)
        moves: dict[str, int] = {}
        moved: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + 3600
        try:
            while not stopping and time.monotonic() < deadline:
                path = self._pick(rng)
                if path is None:
                    continue
                kind = rng.choice(("dir-symlink", "entry-symlink", "plant-symlink", "plant-hardlink", "undo"))
                if self._try(kind, path, rng.choice(targets), rng, moved):
                    moves[kind] = moves.get(kind, 0) + 1
        finally:
            os.close(stop_w)
            os.waitpid(reactor, 0)
        self._report.write_text(json.dumps(moves))

    def _react(self, watcher: Watcher, targets: list[bytes], stop: int) -> None:
        """Swap each entry that appears in a watched directory for a symlink to an outside
        target at once; a new directory is watched, and swapped half of the time."""
        rng = random.Random(self.seed + 1)
        moves: dict[str, int] = {}
        moved: list[tuple[bytes, bytes]] = []
        mine: set[bytes] = set()  # symlinks this process just made: their events are its own
        while True:
            events = watcher.events(0.05, stop)
            if events is None:
                break
            for path, is_dir in events:
                if path in mine or any(m in os.path.basename(path) for m in _OWN_NAMES):
                    mine.discard(path)
                    continue
                if is_dir:
                    watcher.add_tree(path)
                    if rng.random() < 0.5:
                        continue
                kind = "react-dir" if is_dir else "react"
                if self._try(kind, path, rng.choice(targets), rng, moved):
                    mine.add(path)
                    moves[kind] = moves.get(kind, 0) + 1
        self._report.with_suffix(".react").write_text(json.dumps(moves))

    def _try(self, kind: str, path: bytes, target: bytes, rng: random.Random,
             moved: list[tuple[bytes, bytes]]) -> bool:
        try:
            self._move("entry-symlink" if kind == "react" else "dir-symlink" if kind == "react-dir" else kind,
                       path, target, rng, moved)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EEXIST, errno.ENOTDIR,
                                 errno.EISDIR, errno.ENOTEMPTY, errno.EXDEV, errno.EBUSY, errno.ELOOP,
                                 errno.EINVAL, errno.ENAMETOOLONG):
                raise
            return False
        return True

    def _pick(self, rng: random.Random) -> bytes | None:
        """A random entry of the tree, by a random walk that never follows a symlink."""
        cur = os.fsencode(self.tree)
        for _ in range(64):
            try:
                names = os.listdir(cur)
            except OSError:
                return cur
            if not names:
                return cur
            child = os.path.join(cur, rng.choice(names))
            try:
                st = os.lstat(child)
            except OSError:
                return None
            if not stat.S_ISDIR(st.st_mode) or rng.random() < 0.3:
                return child
            cur = child
        return cur

    @staticmethod
    def _move(kind: str, path: bytes, target: bytes, rng: random.Random, moved: list[tuple[bytes, bytes]]) -> None:
        aside = path + b".moved-%d" % rng.randrange(1 << 30)
        if kind == "dir-symlink":
            os.rename(path, aside)
            os.symlink(target, path)
            moved.append((aside, path))
        elif kind == "entry-symlink":
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "a directory")
            os.rename(path, aside)
            os.symlink(target, path)
        elif kind == "plant-symlink":
            parent = path if os.path.isdir(path) and not os.path.islink(path) else os.path.dirname(path)
            os.symlink(target, os.path.join(parent, b"planted-%d" % rng.randrange(1 << 30)))
        elif kind == "plant-hardlink":
            parent = path if os.path.isdir(path) and not os.path.islink(path) else os.path.dirname(path)
            os.link(target, os.path.join(parent, b"linked-%d" % rng.randrange(1 << 30)), follow_symlinks=False)
        elif moved:  # undo: put a moved directory back where it was (the swap flips again)
            aside, orig = moved.pop(rng.randrange(len(moved)))
            os.unlink(orig)
            os.rename(aside, orig)
        else:
            raise OSError(errno.ENOENT, "nothing to undo")


@contextlib.contextmanager
def attacked(tree: Path, outside: Outside, *, seed: int) -> Iterator[Attacker]:
    """``with attacked(tree, outside, seed=n) as a:`` runs the attacker for the block."""
    a = Attacker(tree, outside, seed=seed)
    a.start()
    try:
        yield a
    finally:
        a.stop()
