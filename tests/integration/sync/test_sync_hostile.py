"""Sync against hostile local users (issue #12): a user who can write in DST swaps entries
for symlinks, plants hard links to files outside DST and races the run. Locally and,
where the agent writes DST, through a real sshd. Bind mounts are in
test_sync_bind_mounts.py, trees past PATH_MAX in test_sync_deep.py."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import deltavault.sync.receiver.core as core_mod
import deltavault.sync.receiver.entries as entries_mod
import deltavault.sync.receiver.links as links_mod
from deltavault.sync.local.engine import Syncer
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.options import SyncOptions
from deltavault.testing.hostile import NOBODY, Outside, attacked
from tests.conftest import needs_root, needs_tools
from tests.integration.sync.conftest import REMOTE, nothing_to_do, write
from tests.sshd import Server, missing_tools

pytestmark = [needs_root(), pytest.mark.root, needs_tools("rsync", "setfacl", "mount")]

no_sshd = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")


def run(*args: str, nofile: int | None = None, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The real CLI; ``nofile`` caps its open files (soft and hard limit)."""
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    e = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "deltavault", "--json", *args], env=e, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit)


def sync(src: Path, dst: Path | str, *flags: str, server: Server | None = None,
         nofile: int | None = None, remote: str = REMOTE) -> subprocess.CompletedProcess[str]:
    """A local sync, or a push to ``server`` (whose agent writes DST on this host)."""
    if server is None:
        return run("sync", *flags, str(src), str(dst), nofile=nofile)
    return run("sync", "--remote-command", remote, *flags, str(src), f"dvtest:{dst}", nofile=nofile,
               env={"DELTAVAULT_SSH_CONFIG": str(server.ssh_config)})


def chown_tree(root: Path, uid: int) -> None:
    """Hand a whole tree to ``uid`` (symlinks themselves, not their targets)."""
    os.lchown(root, uid, uid)
    for p in root.rglob("*"):
        os.lchown(p, uid, uid)


def make_acl(path: Path, spec: str) -> None:
    subprocess.run(["setfacl", "-m", spec, str(path)], check=True)


# ---------------------------------------------------------------------------- a racing user

def hostile_source(src: Path) -> None:
    """Everything sync carries, spread over directories that end up writable by nobody in
    DST (mode 0777): files big and small, hard links within and across directories,
    symlinks, FIFOs, device nodes, xattrs and ACLs."""
    for i in range(6):
        d = src / f"d{i}"
        for j in range(10):
            write(d / f"f{j}", os.urandom(200 + 37 * j))
            write(d / "sub" / f"g{j}", b"deeper %d %d\n" % (i, j))
        write(d / "big", os.urandom((1 << 20) + 4096 * i))  # copied by the thread pool
        os.mkfifo(d / "fifo", 0o640)
        os.mknod(d / "null", stat.S_IFCHR | 0o660, os.makedev(1, 3))
        os.symlink("f0", d / "link")
        os.symlink("../d0/sub", d / "dirlink")
        os.link(d / "f1", d / "f1-link")
        os.link(src / "d0" / "f2", d / "sub" / "cross-link") if i else None
        os.setxattr(d / "f3", "user.note", b"value %d" % i)
        os.setxattr(d / "fifo", "trusted.special", b"on a fifo")
        make_acl(d / "f4", "u:1234:rw")
        make_acl(d / "sub", "d:u:1234:rx")
    for p in [src, *src.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o777)


def change_source(src: Path, round_: int) -> None:
    """Between runs: new modes (metadata-only updates of specials and files), content,
    new and removed entries, new hard links."""
    for i in range(6):
        d = src / f"d{i}"
        (d / "fifo").chmod(0o600 + round_ % 3 * 0o004)
        (d / "null").chmod(0o640 + round_ % 3 * 0o002)
        (d / "f5").chmod(0o600 + round_ % 3 * 0o040)
        write(d / "f6", os.urandom(300 + round_))
        new = d / f"new{round_}"
        write(new, b"round %d" % round_)
        os.link(new, d / "sub" / f"new{round_}-link")
        old = d / f"new{round_ - 1}"
        if old.exists():
            old.unlink()
        os.utime(d / "f7", ns=(1, 1_600_000_000_000_000_000 + round_))


def assert_no_traceback(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode in (0, 3), p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


def race(shared_dir: Path, server: Server | None) -> None:
    outside = Outside.create(shared_dir / "outside")
    before = outside.state()
    src, dst = shared_dir / "src", shared_dir / "dst"
    src.mkdir()
    hostile_source(src)
    flags = ("--delete", "--acl", "--xattrs")
    assert sync(src, dst, *flags, server=server).returncode == 0
    chown_tree(dst, NOBODY)  # every entry of DST is now the attacker's to swap and move
    moves: dict[str, int] = {}
    for round_ in range(1, 5):
        change_source(src, round_)
        with attacked(dst, outside, seed=round_) as attacker:
            time.sleep(0.05)  # it has started swapping
            for extra in ((), ("--checksum",)):
                assert_no_traceback(sync(src, dst, *flags, *extra, server=server))
        for k, v in attacker.moves.items():
            moves[k] = moves.get(k, 0) + v
    assert outside.changes(before) == []
    print("attacker moves:", moves)
    assert sum(moves.values()) > 50, moves  # the race really ran
    # Whatever was planted or moved, a run in peace mirrors SRC again.
    p = sync(src, dst, *flags, server=server)
    assert p.returncode == 0, p.stdout[-3000:]
    assert nothing_to_do(src, dst, "-A", "-X", "-D", "--delete") == ""
    assert outside.changes(before) == []


@pytest.mark.slow
def test_a_racing_user_in_the_destination_reaches_nothing_outside(shared_dir: Path) -> None:
    """A real process (uid nobody) keeps swapping DST's entries for symlinks to root-only
    objects outside, moving directories and planting links while syncs (with --delete,
    --acl, --xattrs, --checksum) update DST. Nothing outside changes."""
    race(shared_dir, None)


@pytest.mark.slow
@no_sshd
def test_a_racing_user_in_the_destination_of_a_push_reaches_nothing_outside(shared_dir: Path,
                                                                             server: Server) -> None:
    """The same against the agent at the far end of ssh, which writes DST there."""
    race(shared_dir, server)


# ---------------------------------------------------------------------------- the race, made exact

def _outside_target(shared_dir: Path) -> tuple[Outside, Any]:
    outside = Outside.create(shared_dir / "outside")
    return outside, outside.state()


def untouched(outside: Outside, before: Any) -> list[str]:
    """``Outside.changes`` but for link counts and ctimes, which a link planted to an
    outside file changes by itself, and so does its removal from DST."""
    def strip(state: Any) -> dict[str, tuple[object, ...]]:
        return {p: v[:3] + v[4:6] + v[7:] for p, v in state.items()}
    was, now = strip(before), strip(outside.state())
    return [f"{p}: {was.get(p)} -> {now.get(p)}" for p in sorted(set(was) | set(now)) if was.get(p) != now.get(p)]


def names_of(root: Path, target: Path) -> list[str]:
    ino = os.lstat(target).st_ino
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if os.lstat(p).st_ino == ino)


def test_a_special_file_swapped_for_a_symlink_before_its_metadata_is_set(
        shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The window the racing user aims at, hit every time: the FIFO and device node in DST
    are replaced by symlinks to a root-only file after they were examined and before their
    new mode is set. The mode goes to the entry examined (through its handle), never
    through the symlink."""
    outside, before = _outside_target(shared_dir)
    src, dst = shared_dir / "src", shared_dir / "dst"
    src.mkdir()
    os.mkfifo(src / "fifo", 0o640)
    os.mknod(src / "null", stat.S_IFCHR | 0o660, os.makedev(1, 3))
    assert Syncer(src, dst, SyncOptions(processes=1)).run().problems == []
    (src / "fifo").chmod(0o604)
    (src / "null").chmod(0o666)
    real = MetaPolicy.differs
    swapped: list[str] = []

    def differs(self: MetaPolicy, have: os.stat_result, *a: Any, **kw: Any) -> bool:
        if stat.S_ISFIFO(have.st_mode) or stat.S_ISCHR(have.st_mode):
            name = "fifo" if stat.S_ISFIFO(have.st_mode) else "null"
            os.rename(dst / name, dst / f"{name}.aside")
            os.symlink(outside.root / "secret", dst / name)
            swapped.append(name)
        return real(self, have, *a, **kw)

    monkeypatch.setattr(MetaPolicy, "differs", differs)
    Syncer(src, dst, SyncOptions(processes=1)).run()
    assert sorted(swapped) == ["fifo", "null"]
    assert outside.changes(before) == []
    assert stat.S_IMODE(os.lstat(dst / "fifo.aside").st_mode) == 0o604  # set on the entry examined


def test_a_linked_file_swapped_for_a_link_to_an_outside_file_before_linking(
        shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hard links are made last. Just before, the first name is replaced by a hard link to
    a root-only file outside: the links are still made to the file this run installed
    (through its handle), so the outside file gets no new name."""
    outside, before = _outside_target(shared_dir)
    src, dst = shared_dir / "src", shared_dir / "dst"
    write(src / "hl1", b"linked content")
    os.link(src / "hl1", src / "hl2")
    real = links_mod.lstat_at

    def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
        if name == b"hl2" and not (dst / "hl1.aside").exists():
            os.rename(dst / "hl1", dst / "hl1.aside")
            os.link(outside.root / "secret", dst / "hl1")
        return real(dir_fd, name)

    monkeypatch.setattr(links_mod, "lstat_at", lstat_at)
    Syncer(src, dst, SyncOptions(processes=1)).run()
    assert untouched(outside, before) == []
    assert names_of(dst, outside.root / "secret") == ["hl1"]  # the planted name only: none added
    assert os.stat(dst / "hl2").st_ino == os.stat(dst / "hl1.aside").st_ino  # the file installed


def test_a_fifo_swapped_in_for_a_destination_file_is_never_opened(shared_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A DST file is replaced by a FIFO after it was listed and before it is opened. Were
    the FIFO opened for reading, the run would block until a writer came (the alarm ends
    the test instead)."""
    src, dst = shared_dir / "src", shared_dir / "dst"
    write(src / "f", b"content")
    assert Syncer(src, dst, SyncOptions(processes=1)).run().problems == []
    real = entries_mod.fix_meta

    def fifo_in_place(dfd: int, name: bytes, *a: Any, **kw: Any) -> Any:
        os.rename(name, name + b".aside", src_dir_fd=dfd, dst_dir_fd=dfd)
        os.mkfifo(name, 0o644, dir_fd=dfd)
        return real(dfd, name, *a, **kw)

    monkeypatch.setattr(core_mod, "fix_meta", fifo_in_place)
    old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("blocked on the FIFO")))
    signal.alarm(20)
    try:
        r = Syncer(src, dst, SyncOptions(processes=1)).run()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert [(p.path, p.kind) for p in r.problems] == [("f", "write")]
    assert "replaced during the run" in r.problems[0].message


# ---------------------------------------------------------------------------- planted hard links

def plant_links(src: Path, dst: Path, outside: Outside) -> None:
    """DST entries that are hard links to root-only objects outside, under names SRC has,
    each looking like what SRC has (as a user can plant where fs.protected_hardlinks is 0)."""
    secret, tagged = outside.root / "secret", outside.root / "tagged"
    dst.mkdir()
    # Same size and mtime as SRC's file, another mode: "content equal, fix the metadata".
    write(src / "same.txt", secret.read_bytes(), 0o644)
    os.utime(src / "same.txt", ns=(1, secret.stat().st_mtime_ns))
    os.link(secret, dst / "same.txt")
    # A FIFO and a device node of the same kind, other modes.
    os.mkfifo(src / "fifo", 0o640)
    os.link(outside.root / "fifo", dst / "fifo")
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.link(outside.root / "null", dst / "null")
    # A hard-link group whose first name is kept as it is (all its metadata equal), and a
    # second name to make: it must not become a name of the outside file.
    write(src / "g1", tagged.read_bytes(), 0o640)
    os.utime(src / "g1", ns=(1, tagged.stat().st_mtime_ns))
    os.link(src / "g1", src / "g2")
    os.link(tagged, dst / "g1")


@pytest.mark.parametrize("where", ["local", pytest.param("push", marks=no_sshd)])
def test_hard_links_planted_to_outside_files_are_replaced_never_changed(shared_dir: Path, where: str,
                                                                        request: pytest.FixtureRequest) -> None:
    """An entry with other links may be a link to a file outside DST: it is replaced by a
    new file, never chmod'ed, written or linked to in place."""
    server = request.getfixturevalue("server") if where == "push" else None
    outside, before = _outside_target(shared_dir)
    src, dst = shared_dir / "src", shared_dir / "dst"
    src.mkdir()
    plant_links(src, dst, outside)
    p = sync(src, dst, server=server)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert untouched(outside, before) == []
    for obj in ("secret", "fifo", "null", "tagged"):
        assert names_of(dst, outside.root / obj) == []  # replaced, and not linked to
    assert nothing_to_do(src, dst, "-D") == ""
    for name in ("same.txt", "fifo", "null", "g1"):
        assert os.lstat(dst / name).st_nlink == (2 if name == "g1" else 1)
    assert os.stat(dst / "g1").st_ino == os.stat(dst / "g2").st_ino != os.stat(outside.root / "tagged").st_ino
