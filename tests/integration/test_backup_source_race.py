"""Backup of a source that another process changes between the walk's listing of an entry
and its read: each change is made at a known point, by wrapping the call the walk makes
next (no timing), and what the snapshot records is checked against the files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import deltavault.backup.files.regular as regular_mod
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.model.nodes import Node
from deltavault.objects.walk import walk
from deltavault.progress import NullReporter
from deltavault.repository.repository import Repository


def _before_open(monkeypatch: pytest.MonkeyPatch, name: bytes, action: Callable[[], None]) -> None:
    """Run ``action`` once, right before the walk opens the file ``name`` to read it: after
    its lstat, as a racing writer could."""
    real = regular_mod.open_regular
    pending = [action]

    def open_regular(dir_fd: int, fsname: bytes) -> int:
        if fsname == name and pending:
            pending.pop()()
        return real(dir_fd, fsname)

    monkeypatch.setattr(regular_mod, "open_regular", open_regular)


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
    _before_open(monkeypatch, b"b", lambda: os.rename(intruder, src / "b"))
    res = run_backup(repo, BackupRequest(paths=[str(src)]), NullReporter())
    nodes = _nodes(repo, res.snapshot.tree)
    assert nodes[b"src/b"].content == nodes[b"src/ctl-intruder"].content
    for other in (b"src/c", b"src/d"):
        assert nodes[other].content == nodes[b"src/ctl-original"].content, other
        assert nodes[other].inode == (src / "c").stat().st_ino
    assert nodes[b"src/b"].inode == (src / "b").stat().st_ino
