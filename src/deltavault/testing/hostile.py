"""A hostile local user, for tests and race trials.

``Attacker`` is a real process that drops to another uid (nobody) and, while deltavault
works in a tree, keeps swapping the entries it can write for symlinks pointing outside,
moving directories away, and planting symlinks and hard links. ``Outside`` is a set of
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
        # An ACL the attack might try to overwrite (system.posix_acl_access, version 2:
        # user::rw-, group::r--, other::---).
        acl = b"\x02\x00\x00\x00" + b"".join(
            tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + (0xFFFFFFFF).to_bytes(4, "little")
            for tag, perm in ((0x01, 6), (0x04, 4), (0x20, 0)))
        with contextlib.suppress(OSError):
            os.setxattr(tagged, b"system.posix_acl_access", acl)
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


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


class Attacker:
    """Attacks ``tree`` from a forked child running as ``uid`` until ``stop()``.

    Each move picks a random entry by a random walk from the top and does one of: swap a
    directory for a symlink to an outside target (and sometimes back), replace a file or
    special file with such a symlink, plant a symlink or hard link under a new name.
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
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            code = 0
            try:
                _drop_privileges(self.uid)
                self._attack()
            except BaseException:
                code = 1
            os._exit(code)
        self.pid = pid
        return self

    def stop(self) -> dict[str, int]:
        """Stop the child; returns how many moves of each kind succeeded."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            os.waitpid(self.pid, 0)
            self.pid = 0
        try:
            self.moves = json.loads(self._report.read_text())
            self._report.unlink()
        except (OSError, ValueError):
            self.moves = {}
        return self.moves

    def __enter__(self) -> Attacker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the child
    def _attack(self) -> None:
        rng = random.Random(self.seed)
        moves: dict[str, int] = {}
        stopping = False

        def on_term(_s: int, _f: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, on_term)
        targets = [os.fsencode(t) for t in self.outside.targets]
        moved: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + 3600
        while not stopping and time.monotonic() < deadline:
            path = self._pick(rng)
            if path is None:
                continue
            kind = rng.choice(("dir-symlink", "entry-symlink", "plant-symlink", "plant-hardlink", "undo"))
            try:
                self._move(kind, path, rng.choice(targets), rng, moved)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EEXIST, errno.ENOTDIR,
                                     errno.EISDIR, errno.ENOTEMPTY, errno.EXDEV, errno.EBUSY, errno.ELOOP,
                                     errno.EINVAL, errno.ENAMETOOLONG):
                    raise
                continue
            moves[kind] = moves.get(kind, 0) + 1
        self._report.write_text(json.dumps(moves))

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
