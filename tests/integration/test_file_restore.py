"""Restore of file backups through the real engine: chosen paths, names and symlinks that
would lead out of the target, directory metadata set after the last entry, a damaged blob
that spoils only its file (split from test_file_backup.py)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import msgspec
import pytest

from deltavault.errors import CorruptionError
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.objects.walk import find
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from tests.integration.test_file_backup import backup, restore
from tests.treeutil import manifest


def test_restore_chosen_paths(tmp_path: Path, repo: Repository) -> None:
    src = tmp_path / "src"
    (src / "keep" / "sub").mkdir(parents=True)
    (src / "skip").mkdir()
    (src / "keep" / "sub" / "x").write_text("x")
    (src / "skip" / "y").write_text("y")
    (src / "top").write_text("t")
    res = backup(repo, src)
    out = tmp_path / "out"
    r = restore(repo, res, out, include=["src/keep/sub", "src/top", "src/missing"])
    assert (out / "src" / "keep" / "sub" / "x").read_text() == "x"
    assert (out / "src" / "top").read_text() == "t"
    assert not (out / "src" / "skip").exists()
    assert [p.kind for p in r.problems] == ["missing"]


def _tampered_snapshot(repo: Repository, nodes: list[Node]) -> Snapshot:
    tid, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(nodes)))
    root, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(
        Tree([Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=tid)])))
    repo.flush()
    return Snapshot(time="t", time_ns=0, hostname="h", tree=root)


@pytest.mark.parametrize("evil", [b"..", b"a/../../escape", b"/etc/passwd", b".", b""])
def test_restore_refuses_names_that_escape(tmp_path: Path, repo: Repository, evil: bytes) -> None:
    snap = _tampered_snapshot(repo, [Node(name=evil, type=NodeType.FILE, mode=0o644)])
    out = tmp_path / "out"
    r = FileRestorer(repo, out, RestoreOptions())
    assert snap.tree is not None
    r.run(snap.tree)
    assert [p.kind for p in r.problems] == ["corrupt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", "repo", "cache"]) or not (tmp_path / "escape").exists()
    assert list((out / "src").iterdir()) == []


def test_restore_refuses_symlink_then_directory_trick(tmp_path: Path, repo: Repository) -> None:
    """A tree that first restores a symlink 'a' -> outside, then writes 'a/x' through it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    sub, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(
        Tree([Node(name=b"x", type=NodeType.FILE, mode=0o644)])))
    evil = [Node(name=b"a", type=NodeType.SYMLINK, target=os.fsencode(outside)),
            Node(name=b"a", type=NodeType.DIR, mode=0o755, subtree=sub)]
    snap = _tampered_snapshot(repo, evil)
    r = FileRestorer(repo, tmp_path / "out", RestoreOptions())
    assert snap.tree is not None
    r.run(snap.tree)
    assert list(outside.iterdir()) == []
    assert any(p.kind == "corrupt" for p in r.problems)


def test_restore_does_not_follow_existing_symlinks_in_target(tmp_path: Path, repo: Repository) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("data")
    res = backup(repo, src)
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    (out / "src").mkdir(parents=True)
    (out / "src" / "d").symlink_to(outside)  # planted by someone else
    r = restore(repo, res, out)
    assert list(outside.iterdir()) == []
    assert (out / "src" / "d" / "f").read_text() == "data" and not (out / "src" / "d").is_symlink()
    assert not r.problems


def test_directory_metadata_waits_for_batched_and_large_files(tmp_path: Path, repo: Repository) -> None:
    """Small files are written in batches that span directories, large ones by workers; each
    directory's mode and times are set only after its last entry is written."""
    from deltavault.restore import regular as restore_files

    src = tmp_path / "src"
    rnd = random.Random(3)
    for d in range(12):
        sub = src / f"d{d:02}" / "inner"
        sub.mkdir(parents=True)
        for i in range(40):  # 960 small files: several batches, each across directories
            (sub.parent / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(0, 3000)))
            (sub / f"g{i}").write_bytes(rnd.randbytes(50))
        if d % 4 == 0:  # a large file, written by a worker while the walk goes on
            (sub / "big").write_bytes(rnd.randbytes(restore_files.INLINE_BELOW + 12345))
        sub.chmod(0o555)
        sub.parent.chmod(0o711)
    res = backup(repo, src)
    out = tmp_path / "out"
    r = restore(repo, res, out, verify=True)
    assert not r.problems, r.problems
    assert r.stats.files == 12 * 80 + 3 and r.stats.dirs == 25
    assert manifest(out / "src") == manifest(src)  # modes included
    dirs = [p.relative_to(src) for p in src.rglob("*") if p.is_dir()]
    assert len(dirs) == 24
    assert {d: (out / "src" / d).stat().st_mtime_ns for d in dirs} == {d: (src / d).stat().st_mtime_ns for d in dirs}


def test_damaged_blob_spoils_only_its_file(tmp_path: Path, repo: Repository) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "good").write_bytes(os.urandom(100_000))
    (src / "bad").write_bytes(os.urandom(100_000))
    res = backup(repo, src)
    assert res.snapshot.tree is not None
    node = find(repo, res.snapshot.tree, "src/bad")
    assert node is not None
    loc = repo.index.lookup(node.content[0].id)  # type: ignore[union-attr]
    assert loc is not None
    from deltavault.repository.pack import pack_name

    path = tmp_path / "repo" / pack_name(loc.pack_id)
    raw = bytearray(path.read_bytes())
    raw[loc.offset + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    out = tmp_path / "out"
    r = restore(repo, res, out)
    assert (out / "src" / "good").read_bytes() == (src / "good").read_bytes()
    assert not (out / "src" / "bad").exists()
    assert [(p.path, p.kind) for p in r.problems] == [("src/bad", "corrupt")]
    with pytest.raises(CorruptionError):
        repo.load_blob(node.content[0].id)  # type: ignore[union-attr]
