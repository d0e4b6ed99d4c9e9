"""Restore into a target that another local user writes in while the restore runs, and of
trees too deep for paths: nothing outside the target is ever read, written, chmodded,
chowned, given xattrs or linked, and any depth restores within a small file limit."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from deltavault.fs.dirfd import Replaced
from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.types import BlobType
from deltavault.progress import NullReporter
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from deltavault.restore.target import LinkSources
from deltavault.testing.hostile import NOBODY, Outside, attacked, mirror_names, rich_tree
from tests.conftest import Cli, needs_root
from tests.hostileutil import PATH_MAX, deltavault, lines, make_deep, one_dir_snapshot
from tests.treeutil import manifest


@needs_root()
def test_restore_under_a_racing_attacker_touches_nothing_outside(shared_dir: Path, cli: Cli) -> None:
    """A process running as nobody keeps swapping directories and entries of the target for
    symlinks to root-only objects outside it, moves directories and plants links, while
    restores run: into an empty target (only its root is open to the attacker) and over an
    earlier restore (every restored directory is 0777). Nothing outside changes."""
    src = shared_dir / "src"
    rich_tree(src)
    assert deltavault(cli, "init").returncode == 0
    assert deltavault(cli, "backup", str(src)).returncode == 0
    outside = Outside.create(shared_dir / "outside")
    mirror_names(outside)
    before = outside.state()
    moves: dict[str, int] = {}
    for seed in range(6):
        target = shared_dir / f"target{seed // 3}"
        target.mkdir(mode=0o777, exist_ok=True)
        target.chmod(0o777)
        with attacked(target, outside, seed=seed) as attacker:
            r = deltavault(cli, "restore", "latest", "--target", str(target))
        for k, v in attacker.moves.items():
            moves[k] = moves.get(k, 0) + v
        assert r.returncode in (0, 3), r.stdout[-3000:] + r.stderr[-3000:]
        assert outside.changes(before) == [], "\n".join(outside.changes(before))
    assert sum(moves.values()) > 50, moves  # the attack was real, and busy


@needs_root()
def test_restore_without_attack_is_exact(shared_dir: Path, cli: Cli) -> None:
    src = shared_dir / "src"
    rich_tree(src, dirs=3)
    assert deltavault(cli, "init").returncode == 0
    assert deltavault(cli, "backup", str(src)).returncode == 0
    for _ in range(2):  # into an empty target, then over the first restore
        r = deltavault(cli, "restore", "latest", "--target", str(shared_dir / "out"), "--verify")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert manifest(shared_dir / "out" / "src") == manifest(src)


def _swap_after(real: Callable[..., None], outside: Path) -> Callable[..., None]:
    """``real`` (os.mkfifo, os.mknod), then at once the worst move of an attacker: the new
    entry replaced by a symlink to ``outside``."""
    def wrapped(name: bytes, *args: object, dir_fd: int | None = None) -> None:
        real(name, *args, dir_fd=dir_fd)
        os.unlink(name, dir_fd=dir_fd)
        os.symlink(outside, name, dir_fd=dir_fd)
    return wrapped


@needs_root()
@pytest.mark.parametrize("kind", [NodeType.FIFO, NodeType.CHARDEV])
def test_a_special_file_swapped_for_a_symlink_at_once_gets_no_metadata_outside(
        tmp_path: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch, kind: NodeType) -> None:
    """The issue's case: FIFO and device metadata was applied by name, so a symlink put in
    place of the new node made a root-only file outside mode 0666. Here the swap happens
    right after the node is made, every time."""
    outside = Outside.create(tmp_path / "outside")
    before = outside.state()
    node = Node(name=b"node", type=kind, mode=0o666, uid=NOBODY, gid=NOBODY, rdev=os.makedev(1, 3),
                mtime=1, atime=1, xattrs=[(b"trusted.x", b"1")])
    root = one_dir_snapshot(repo, [node])
    real = os.mkfifo if kind == NodeType.FIFO else os.mknod
    monkeypatch.setattr(os, real.__name__, _swap_after(real, outside.root / "secret"))
    r = FileRestorer(repo, tmp_path / "out", RestoreOptions())
    r.run(root)
    monkeypatch.undo()
    assert outside.changes(before) == []
    assert [(p.path, p.kind) for p in r.problems] == [("src/node", "write")]
    assert "replaced during the run" in r.problems[0].message


@needs_root()
def test_a_hard_link_is_made_to_the_file_restored_not_to_what_its_path_names_now(
        tmp_path: Path, repo: Repository) -> None:
    """The issue's case: the second name of a hard link was made with os.link(target/path of
    the first), so a directory on that path swapped for a symlink linked a file outside.
    Here the swap is made right after the first name is written."""
    outside = Outside.create(tmp_path / "outside")
    (outside.root / "private" / "first").write_bytes(b"outside\n")
    before = outside.state()
    bid, _ = repo.save_blob(BlobType.DATA, b"inside\n")
    sub_x, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree([
        Node(name=b"first", type=NodeType.FILE, mode=0o644, size=7, links=2, dev=1, inode=9,
             content=[Full(bid, 7)])])))
    sub_y, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree([
        Node(name=b"second", type=NodeType.FILE, mode=0o644, size=7, links=2, dev=1, inode=9,
             content=[Full(bid, 7)])])))
    root = one_dir_snapshot(repo, [Node(name=b"x", type=NodeType.DIR, mode=0o755, subtree=sub_x),
                                    Node(name=b"y", type=NodeType.DIR, mode=0o755, subtree=sub_y)])
    out = tmp_path / "out"

    class SwapOnFirstFile(NullReporter):
        done = False

        def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
            if not self.done:
                self.done = True
                os.rename(out / "src" / "x", out / "src" / "x.moved")
                os.symlink(outside.root / "private", out / "src" / "x")

    r = FileRestorer(repo, out, RestoreOptions(), SwapOnFirstFile())
    r.run(root)
    assert outside.changes(before) == []
    assert (out / "src" / "y" / "second").read_bytes() == b"inside\n"
    assert os.stat(out / "src" / "y" / "second").st_ino == os.stat(out / "src" / "x.moved" / "first").st_ino
    assert r.stats.links == 1, r.problems


def test_a_hard_link_source_found_again_by_path_must_be_the_same_file(tmp_path: Path) -> None:
    """Once its handle is let go, the first name is looked up again by path (no symlink
    followed) and must be the file that was written."""
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    links = LinkSources(rfd, keep=0)
    try:
        fd = os.open(root / "a" / "f", os.O_RDWR | os.O_CREAT, 0o600)
        links.reserve((1, 1))
        links.add((1, 1), b"a/f", fd)
        os.close(fd)
        links.link((1, 1), rfd, b"g", shared=False)
        assert os.stat(root / "g").st_ino == os.stat(root / "a" / "f").st_ino
        os.rename(root / "a" / "f", root / "a" / "f.old")
        (root / "a" / "f").write_bytes(b"another file")
        with pytest.raises(Replaced):
            links.link((1, 1), rfd, b"h", shared=False)
        os.rename(root / "a", root / "a.old")
        os.symlink(root / "a.old", root / "a")
        with pytest.raises(OSError):
            links.link((1, 1), rfd, b"h", shared=False)
        assert not (root / "h").exists()
    finally:
        links.close()
        os.close(rfd)


@pytest.mark.slow
def test_a_depth_5000_tree_past_path_max_restores_with_few_open_files(shared_dir: Path, cli: Cli) -> None:
    """The issue's case: restore died of RecursionError at depth ~490. Now any depth restores,
    past PATH_MAX, under a 256-file limit, with every directory's metadata."""
    src = shared_dir / "src"
    src.mkdir()
    rel = make_deep(src, 5000, b"at the bottom\n")
    assert deltavault(cli, "init").returncode == 0
    assert deltavault(cli, "backup", str(src), nofile=256).returncode == 0
    out = shared_dir / "out"
    r = deltavault(cli, "restore", "latest", "--target", str(out), "--verify", nofile=256)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = lines(r.stdout, "summary")[-1]
    assert summary["files"] == 1 and summary["dirs"] == 5001, summary
    fd = os.open(out / "src", os.O_RDONLY | os.O_DIRECTORY)
    try:
        parts = rel.split(b"/")
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open(parts[-1], os.O_RDONLY, dir_fd=fd)
        assert os.read(leaf, 100) == b"at the bottom\n"
        os.close(leaf)
    finally:
        os.close(fd)
    assert len(os.fsencode(out)) + len(rel) > PATH_MAX


@needs_root()
def test_no_special_skips_devices_and_fifos_and_no_setuid_clears_the_bits(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.symlink("file", src / "link")
    (src / "file").write_text("x")
    (src / "file").chmod(0o6755)
    (src / "sgid-dir").mkdir()
    (src / "sgid-dir").chmod(0o2775)
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    out = tmp_path / "out"
    r = cli("--json", "restore", "latest", "--target", str(out), "--no-special", "--no-setuid")
    assert r.returncode == 0, r.stderr
    s = r.last("summary")
    assert s["skipped_special"] == 2 and s["special"] == 1 and s["errors"] == 0
    got = out / "src"
    assert sorted(p.name for p in got.iterdir()) == ["file", "link", "sgid-dir"]
    assert stat.S_IMODE((got / "file").stat().st_mode) == 0o755
    assert stat.S_IMODE((got / "sgid-dir").stat().st_mode) == 0o2775  # a directory's setgid is kept
    text = cli("restore", "latest", "--target", str(tmp_path / "out2"), "--no-special")
    assert "skipped 2 device node(s) and FIFO(s) (--no-special)" in text.stdout
    full = cli("--json", "restore", "latest", "--target", str(tmp_path / "out3"))
    assert full.last("summary")["special"] == 3
    assert stat.S_IMODE((tmp_path / "out3" / "src" / "file").stat().st_mode) == 0o6755


def test_a_file_whose_size_disagrees_with_its_content_is_refused_with_its_path(repo: Repository,
                                                                               tmp_path: Path) -> None:
    """Was: cut or padded with zeros to the recorded size, silently."""
    bid, _ = repo.save_blob(BlobType.DATA, b"12345")
    root = one_dir_snapshot(repo, [
        Node(name=b"liar.bin", type=NodeType.FILE, mode=0o644, size=4096, content=[Full(bid, 5)]),
        Node(name=b"short.bin", type=NodeType.FILE, mode=0o644, size=2, content=[Full(bid, 5)]),
        Node(name=b"ok.bin", type=NodeType.FILE, mode=0o644, size=5, content=[Full(bid, 5)])])
    r = FileRestorer(repo, tmp_path / "out", RestoreOptions())
    r.run(root)
    got = sorted((p.path, p.kind) for p in r.problems)
    assert got == [("src/liar.bin", "corrupt"), ("src/short.bin", "corrupt")]
    assert all("records" in p.message and "not restored" in p.message for p in r.problems)
    assert sorted(os.listdir(tmp_path / "out" / "src")) == ["ok.bin"]
    assert (tmp_path / "out" / "src" / "ok.bin").read_bytes() == b"12345"
