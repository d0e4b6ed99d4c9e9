"""Sync against hostile local users and hostile trees (issue #12): a user who can write in
DST swaps entries for symlinks, plants hard links to files outside DST and races the run;
bind mounts show SRC inside DST, DST inside SRC, or SRC inside itself; a tree 5,000
directories deep, past PATH_MAX, under a 256-file limit. Locally and, where the agent
writes DST, through a real sshd."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import deltavault.sync.local.dirs as dirs_mod
import deltavault.sync.receiver.core as core_mod
import deltavault.sync.receiver.entries as entries_mod
import deltavault.sync.receiver.links as links_mod
from deltavault.progress import NullReporter
from deltavault.sync.local.engine import Syncer
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.options import SyncOptions
from deltavault.testing.hostile import NOBODY, Outside, attacked
from tests.conftest import needs_root, needs_tools
from tests.hostileutil import make_deep
from tests.integration.sync.conftest import REMOTE, nothing_to_do, summary, write
from tests.integration.sync.test_sync_tree import stat_map
from tests.sshd import Server, missing_tools, sshd
from tests.treeutil import remove_tree

pytestmark = [needs_root(), pytest.mark.root, needs_tools("rsync", "setfacl", "mount")]

PATH_MAX = 4096
no_sshd = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with sshd(tmp_path) as srv:
        yield srv


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


# ---------------------------------------------------------------------------- bind mounts

@contextlib.contextmanager
def bind(what: Path, where: Path) -> Iterator[Path]:
    where.mkdir(exist_ok=True, parents=True)
    subprocess.run(["mount", "--bind", str(what), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def tree_state(root: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, digest)
    return out


def source_with_parent(tmp_path: Path) -> Path:
    src = tmp_path / "parent" / "src"
    for rel in ("a/x", "b/y", "b/c/z"):
        write(src / rel, rel.encode())
    write(tmp_path / "parent" / "sibling", b"next to SRC")
    return src


@pytest.mark.parametrize("where", ["local", pytest.param("push", marks=no_sshd)])
def test_a_destination_overlapping_the_source_through_a_bind_mount_is_refused(
        tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    """DST as the source's parent, a directory inside SRC, SRC itself, or a place where it
    would be created inside SRC, each seen through a bind mount under another name: refused
    with exit 2 before anything is written, and SRC is untouched even with --delete."""
    server = request.getfixturevalue("server") if where == "push" else None
    src = source_with_parent(tmp_path)
    parent = src.parent
    before = tree_state(parent)
    views = tmp_path / "views"
    cases: list[tuple[Path, Path, str, str]] = [  # what is shown, where, the refusal, a missing DST there
        (parent, views / "parent", "contains the source", "src/not-yet/made"),
        (src / "b", views / "b", "is inside the source", "not-yet/made"),
        (src, views / "src", "is the source", "not-yet/made"),
    ]
    for what, view, message, missing in cases:
        with bind(what, view):
            for dst, want in ((view, message), (view / missing, "would be created inside the source")):
                p = sync(src, dst, "--delete", server=server)
                out = p.stdout + p.stderr
                assert p.returncode == 2, out
                assert want in out and "judged by device and inode" in out, out
        assert tree_state(parent) == before  # nothing made, nothing deleted


@needs_tools("btrfs", "mkfs.btrfs")
def test_a_destination_inside_the_live_source_of_a_snapshot_sync_is_refused(btrfs_src: tuple[Path, Path]) -> None:
    """The engine reads a snapshot, a tree of its own; DST is still judged against the
    live SRC, before any snapshot is taken."""
    mnt, src = btrfs_src
    for dst in (src / "docs", src / "mirror" / "new"):
        p = run("sync", "--snapshot", "btrfs", "--delete", str(src), str(dst))
        assert p.returncode == 2 and "source and destination overlap" in p.stdout + p.stderr, p.stdout + p.stderr
    assert not (src / "mirror").exists() and (src / "docs" / "a.txt").read_bytes() == b"version 1"
    assert not (mnt / "data" / ".deltavault-snapshots").exists() or not any(
        (mnt / "data" / ".deltavault-snapshots").iterdir())


def test_a_mount_inside_the_destination_showing_the_source_is_left_alone(tmp_path: Path) -> None:
    """DST itself is elsewhere, but one of its directories is a bind mount of a part of
    SRC: nothing is written there and --delete does not reach into it."""
    src = source_with_parent(tmp_path)
    dst = tmp_path / "dst"
    write(dst / "stale", b"removed by --delete")
    before = tree_state(src)
    with bind(src / "b", dst / "b"), bind(src / "b" / "c", dst / "extra"):
        p = run("sync", "--delete", str(src), str(dst))
        assert tree_state(src) == before
    assert p.returncode == 3, p.stdout + p.stderr
    got = sorted((x["path"], x["kind"]) for x in summary(p)["problems"])
    assert got == [("b", "write"), ("extra", "delete")], got
    assert not (dst / "stale").exists() and (dst / "a" / "x").read_bytes() == b"a/x"


@pytest.mark.parametrize("processes", [1, 2])
def test_a_bind_mount_of_the_source_inside_itself_is_entered_once(tmp_path: Path, processes: int) -> None:
    """A loop (SRC mounted below itself) and a second view of SRC/b: each is reported and
    kept empty, the walk does not recurse into them (without the check, 40 levels and
    counting), with one process or with workers alike. Exit 0: nothing failed."""
    src = tmp_path / "src"
    write(src / "a" / "inner" / "file", b"once")
    write(src / "b" / "x", b"b")
    dst = tmp_path / f"dst{processes}"
    with bind(src, src / "a" / "inner" / "loop"), bind(src / "b", src / "c"):
        p = run("sync", "--delete", "--processes", str(processes), str(src), str(dst), timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = summary(p)
    got = sorted((x["path"], x["kind"]) for x in s["problems"])
    assert got == [("a/inner/loop", "skipped"), ("c", "skipped")], got
    assert all("a mount showing the source" in x["message"] for x in s["problems"])
    assert s["errors"] == 0
    assert sorted(str(x.relative_to(dst)) for x in dst.rglob("*")) == [
        "a", "a/inner", "a/inner/file", "a/inner/loop", "b", "b/x", "c"]


# ---------------------------------------------------------------------------- depth

def deep_manifest(root: Path) -> dict[bytes, tuple[Any, ...]]:
    """Every entry's type, mode, owner, mtime (files) and content, walked by fd: no path
    is resolved, so PATH_MAX does not apply (diff and rsync stop at it)."""
    out: dict[bytes, tuple[Any, ...]] = {}
    stack = [(os.open(root, os.O_RDONLY | os.O_DIRECTORY), b"")]
    try:
        while stack:
            fd, rel = stack.pop()
            try:
                for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    crel = rel + b"/" + name if rel else name
                    data = b""
                    if stat.S_ISREG(st.st_mode):
                        f = os.open(name, os.O_RDONLY, dir_fd=fd)
                        data = os.read(f, 1 << 20)
                        os.close(f)
                    elif stat.S_ISDIR(st.st_mode):
                        stack.append((os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd), crel))
                    out[crel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                                 st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else 0, data)
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
    return out


def _deep_fd(root: Path, levels: int) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        nfd = os.open(b"d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _write_at(root: Path, levels: int, name: bytes, data: bytes) -> None:
    fd = _deep_fd(root, levels)
    try:
        f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
        os.write(f, data)
        os.close(f)
    finally:
        os.close(fd)


def _deep_run(sync_: Callable[..., subprocess.CompletedProcess[str]], src: Path, dst: Path) -> None:
    p = sync_("--delete")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = summary(p)
    assert s["dirs_created"] == 5000 and s["files_new"] == 2 and s["hardlinks"] == 1 and s["symlinks"] == 1
    assert deep_manifest(src) == deep_manifest(dst)
    # unchanged: nothing to do
    s = summary(sync_("--delete"))
    assert s["bytes_written"] == 0 and s["files_same"] == 4 and s["dirs_created"] == 0
    # a change at the bottom, and a deep tree only DST has, which --delete removes
    _write_at(src, 5000, b"leaf", b"changed at the bottom\n")
    extra = _deep_fd(dst, 10)
    try:
        os.mkdir(b"extra", dir_fd=extra)
        make_deep(Path(f"/proc/self/fd/{extra}/extra"), 4990, b"only in DST\n")
    finally:
        os.close(extra)
    p = sync_("--delete")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = summary(p)
    assert s["files_updated"] == 1 and s["deleted"] == 4990 + 2
    assert deep_manifest(src) == deep_manifest(dst)


def deep_source(src: Path) -> None:
    src.mkdir()
    rel = make_deep(src, 5000, b"at the bottom\n")
    assert len(os.fsencode(src)) + 1 + len(rel) > 2 * PATH_MAX
    _write_at(src, 2500, b"middle", b"in the middle\n")
    fd = _deep_fd(src, 4999)
    try:
        os.link(b"d/leaf", b"link-to-leaf", src_dir_fd=fd, dst_dir_fd=fd)  # linked across levels
        os.symlink(b"d/leaf", b"symlink", dir_fd=fd)
    finally:
        os.close(fd)


def test_directories_closed_for_depth_get_their_metadata_after_their_files(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With two directories open at most, nearly every directory is closed and opened
    again (through "..") while big files of its own are still being copied by threads:
    each still gets its mode and mtime once everything inside is in place."""
    monkeypatch.setattr(dirs_mod, "MAX_OPEN_DIRS", 2)
    src, dst = tmp_path / "src", tmp_path / "dst"
    for i in range(3):
        deep = src / f"t{i}" / "a" / "b" / "c" / "d"
        for level, d in enumerate([deep, *deep.parents][:5]):
            write(d / "big", os.urandom((1 << 20) + level), 0o640)
            write(d / "small", b"small %d" % level)
        os.link(deep / "small", src / f"t{i}" / "link")
    for i, d in enumerate(sorted(p for p in src.rglob("*") if p.is_dir())):
        d.chmod(0o750 if i % 2 else 0o755)
        os.utime(d, ns=(1, 1_500_000_000_000_000_000 + i))
    r = Syncer(src, dst, SyncOptions(processes=1, threads=2)).run()
    assert r.problems == [] and r.stats.hardlinks == 3
    assert stat_map(src) == stat_map(dst)
    assert Syncer(src, dst, SyncOptions(processes=1)).run().stats.bytes_written == 0


class _OnFirstFile(NullReporter):
    def __init__(self, action: Callable[[], None]) -> None:
        self.action: Callable[[], None] | None = action

    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
        if self.action is not None:
            act, self.action = self.action, None
            act()


def _chain(src: Path) -> None:
    """src/a/b/c/d/e/f/file, with a file sorted after each of a and b ("z")."""
    write(src / "a" / "b" / "c" / "d" / "e" / "f" / "file", b"deep")
    for d in (src / "a", src / "a" / "b"):
        write(d / "z", b"after %s" % d.name.encode())


def test_a_closed_directory_moved_in_dst_is_found_again_by_name_and_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deep in the walk, DST's c is moved out of b: ".." of c is not b any more, so b is
    looked up again from DST's root, each level checked, and b's later entry is written."""
    monkeypatch.setattr(dirs_mod, "MAX_OPEN_DIRS", 2)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _chain(src)
    assert Syncer(src, dst, SyncOptions(processes=1)).run().problems == []
    for z in (src / "a" / "z", src / "a" / "b" / "z", src / "a/b/c/d/e/f/file"):
        write(z, b"changed " + z.name.encode())
    r = Syncer(src, dst, SyncOptions(processes=1),
               _OnFirstFile(lambda: os.rename(dst / "a" / "b" / "c", dst / "c-moved"))).run()
    assert r.problems == []
    assert (dst / "a" / "b" / "z").read_bytes() == b"changed z" == (dst / "a" / "z").read_bytes()


def test_a_closed_directory_moved_away_in_dst_is_reported_and_nothing_is_written_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirs_mod, "MAX_OPEN_DIRS", 2)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _chain(src)
    assert Syncer(src, dst, SyncOptions(processes=1)).run().problems == []
    for z in (src / "a" / "z", src / "a" / "b" / "z", src / "a/b/c/d/e/f/file"):
        write(z, b"changed " + z.name.encode())

    def move() -> None:
        os.rename(dst / "a" / "b" / "c", dst / "c-moved")
        os.rename(dst / "a" / "b", dst / "b-moved")

    r = Syncer(src, dst, SyncOptions(processes=1), _OnFirstFile(move)).run()
    assert [(p.path, p.kind) for p in r.problems] == [("a/b", "changed")]
    assert "moved during the run" in r.problems[0].message
    assert (dst / "b-moved" / "z").read_bytes() == b"after b"  # not written where it went
    assert (dst / "a" / "z").read_bytes() == b"changed z"  # a was found again, and finished


@pytest.mark.slow
def test_a_tree_5000_deep_past_path_max_syncs_under_a_256_file_limit(tmp_path: Path) -> None:
    """No walk recurses and no path is resolved: depth and PATH_MAX do not apply, and at
    most MAX_OPEN_DIRS directories of each tree are open, so 256 files are enough."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    deep_source(src)
    try:
        _deep_run(lambda *f: sync(src, dst, *f, nofile=256), src, dst)
    finally:
        remove_tree(dst)
        remove_tree(src)


@pytest.mark.slow
@no_sshd
def test_a_tree_5000_deep_pushes_under_a_256_file_limit_at_both_ends(tmp_path: Path, server: Server) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    deep_source(src)
    remote = f"prlimit --nofile=256:256 {REMOTE}"
    try:
        _deep_run(lambda *f: sync(src, dst, *f, server=server, nofile=256, remote=remote), src, dst)
    finally:
        remove_tree(dst)
        remove_tree(src)
