"""Backup of a source that another process changes between the walk's listing of an entry
and its read: each change is made at a known point, by wrapping the call the walk makes
next (no timing), and what the snapshot records is checked against the files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import deltavault.backup.files.archiver as archiver_mod
import deltavault.backup.files.content as content_mod
import deltavault.backup.files.regular as regular_mod
import deltavault.backup.files.scan as scan_mod
from deltavault.backup.files.options import Excludes, FileBackupOptions, Source
from deltavault.backup.files.run import BackupRequest, run_backup, scan_totals
from deltavault.model.nodes import Node
from deltavault.objects.walk import walk
from deltavault.progress import NullReporter
from deltavault.repository.repository import Repository
from tests.hostileutil import PATH_MAX, before_call, make_deep
from tests.treeutil import remove_tree


def _nodes(repo: Repository, tree: bytes | None) -> dict[bytes, Node]:
    assert tree is not None
    return {p: n for p, n in walk(repo, tree)}


def test_a_hard_link_replaced_before_its_read_does_not_lend_its_content_to_the_others(
        tmp_path: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """b, c and d are one file (three links). b is replaced by another file after its lstat:
    the walk reads the new file under b, and c and d, still the old file, must keep the old
    content (the old walk filed what it read under b's listed inode, so c and d were
    recorded with the intruder's content)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "b").write_bytes(b"original content of the linked file\n")
    os.link(src / "b", src / "c")
    os.link(src / "b", src / "d")
    (src / "ctl-original").write_bytes(b"original content of the linked file\n")
    (src / "ctl-intruder").write_bytes(b"the intruder's content\n")
    intruder = tmp_path / "intruder"
    intruder.write_bytes(b"the intruder's content\n")
    before_call(monkeypatch, regular_mod, "open_regular", b"b", lambda: os.rename(intruder, src / "b"))
    res = run_backup(repo, BackupRequest(paths=[str(src)]), NullReporter())
    nodes = _nodes(repo, res.snapshot.tree)
    assert nodes[b"src/b"].content == nodes[b"src/ctl-intruder"].content
    for other in (b"src/c", b"src/d"):
        assert nodes[other].content == nodes[b"src/ctl-original"].content, other
        assert nodes[other].inode == (src / "c").stat().st_ino
    assert nodes[b"src/b"].inode == (src / "b").stat().st_ino


# ---------------------------------------------------------------------------- progress totals

def test_the_progress_scan_does_not_follow_a_directory_swapped_for_a_symlink(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan that sums sizes for the progress bar lists src/d, then d is swapped for a
    symlink to a root-only directory holding a d/e of its own. The old scan looked src/d/e
    up by path, through the symlink, and counted the root-only file; now e is opened from
    d's fd and only the tree's own file is counted."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "e" / "mine").write_bytes(b"m" * 100)
    (outside / "e").mkdir(parents=True)
    (outside / "e" / "secret").write_bytes(b"s" * 5000)
    outside.chmod(0o700)
    real = Excludes.marker
    swapped: list[bool] = []

    def marker(self: Excludes, dir_fd: int, names: list[bytes]) -> bytes | None:
        if names == [b"e"] and not swapped:  # src/d was just listed
            swapped.append(True)
            os.rename(src / "d", tmp_path / "d-aside")
            os.symlink(outside, src / "d")
        return real(self, dir_fd, names)

    monkeypatch.setattr(Excludes, "marker", marker)
    assert scan_totals([Source(os.fsencode(src), b"src")], FileBackupOptions()) == (100, 1)
    assert swapped


def test_the_progress_scan_counts_past_path_max_within_few_open_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old scan built paths and stopped, silently, where they passed PATH_MAX."""
    monkeypatch.setattr(scan_mod, "MAX_OPEN_DIRS", 8, raising=False)  # (absent from the old scan)
    src = tmp_path / "src"
    src.mkdir()
    (src / "top").write_bytes(b"t" * 10)
    rel = make_deep(src, PATH_MAX // 2 + 10, b"at the bottom\n")
    assert len(rel) > PATH_MAX
    before = len(os.listdir("/proc/self/fd"))
    try:
        assert scan_totals([Source(os.fsencode(src), b"src")], FileBackupOptions()) == (24, 2)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        remove_tree(src)


# ---------------------------------------------------------------------------- changes while read

def _on_read(monkeypatch: pytest.MonkeyPatch, action: Callable[[int, int], None]) -> None:
    """Run ``action(n, fd)`` before the n-th read of file content (n from 0; ``fd``: the file
    read): a writer changing the file while the backup reads it."""
    real = content_mod.read_exact
    calls = [0]

    def read_exact(fd: int, offset: int, length: int) -> bytes:
        action(calls[0], fd)
        calls[0] += 1
        return real(fd, offset, length)

    monkeypatch.setattr(content_mod, "read_exact", read_exact)


def _file_and_control(tmp_path: Path, size: int) -> Path:
    """src/f of ``size`` x's and src/ctl of 1000 (read first: sorted before f)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * size)
    (src / "ctl").write_bytes(b"x" * 1000)
    return src / "f"


def test_a_file_that_shrinks_while_read_is_read_again_and_stored_as_it_now_is(
        tmp_path: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    f = _file_and_control(tmp_path, 3000)
    src = f.parent

    def shrink(n: int, _fd: int) -> None:
        if n == 1:  # (read 0 is ctl's)
            os.truncate(f, 1000)

    _on_read(monkeypatch, shrink)
    res = run_backup(repo, BackupRequest(paths=[str(src)]), NullReporter())
    nodes = _nodes(repo, res.snapshot.tree)
    assert res.problems == []
    assert nodes[b"src/f"].size == 1000 and nodes[b"src/f"].content == nodes[b"src/ctl"].content


def test_a_file_that_grows_at_every_read_is_stored_at_its_last_reads_size_and_reported(
        tmp_path: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read takes the size the open file had (fstat) when it began, so what is stored is
    that many bytes; the growth seen after each of the three reads is reported, never silent."""
    f = _file_and_control(tmp_path, 1000)
    src = f.parent

    def grow(n: int, _fd: int) -> None:
        if n >= 1:
            with open(f, "ab") as out:
                out.write(b"y" * 10)

    _on_read(monkeypatch, grow)
    res = run_backup(repo, BackupRequest(paths=[str(src)]), NullReporter())
    assert [(p.path, p.kind, p.partial) for p in res.problems] == [(str(f), "changed", True)]
    assert "modified while being read 3 times" in res.problems[0].message
    node = _nodes(repo, res.snapshot.tree)[b"src/f"]
    assert node.size == sum(r.size for r in node.content) == 1020  # the size its last read began with


def test_a_directory_swapped_for_a_symlink_to_root_before_it_is_entered_is_not_followed(
        tmp_path: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """Already so: the directory is opened from its parent's fd with O_NOFOLLOW."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "mine").write_bytes(b"mine\n")

    def swap() -> None:
        os.rename(src / "d", tmp_path / "d-aside")
        os.symlink("/", src / "d")

    before_call(monkeypatch, archiver_mod, "open_dir_at", b"d", swap)
    res = run_backup(repo, BackupRequest(paths=[str(src)]), NullReporter())
    assert [(p.path, p.kind) for p in res.problems] == [(str(src / "d"), "changed")]
    assert "not followed" in res.problems[0].message
    assert set(_nodes(repo, res.snapshot.tree)) == {b"src"}


def test_a_sparse_file_whose_hole_is_written_while_read_is_read_again(
        tmp_path: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its extents were mapped before the write, so the first read took the new data for a
    hole; the change of mtime and ctime after the read sends it round again (already so)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("ctl", "f"):  # ctl: as f will be once written
        with open(src / name, "wb") as out:
            out.write(b"head" * 1024)
            out.truncate(1 << 20)
    with open(src / "ctl", "r+b") as out:
        out.seek(512 * 1024)
        out.write(b"late" * 1024)

    ino = os.stat(src / "f").st_ino
    filled: list[int] = []

    def fill(_n: int, fd: int) -> None:
        if os.fstat(fd).st_ino == ino and not filled:  # f's first read
            filled.append(1)
            with open(src / "f", "r+b") as out:
                out.seek(512 * 1024)
                out.write(b"late" * 1024)

    _on_read(monkeypatch, fill)
    res = run_backup(repo, BackupRequest(paths=[str(src)]), NullReporter())
    nodes = _nodes(repo, res.snapshot.tree)
    assert res.problems == [] and filled
    assert nodes[b"src/f"].content == nodes[b"src/ctl"].content
