"""Backup of a hostile source tree's depth: 5,000 directories, past PATH_MAX, under a 256-file
limit, and ancestors closed for depth that are moved while the walk is below them (split
from test_backup_hostile.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import deltavault.backup.files.archiver as files_mod
from deltavault.backup.files.run import BackupRequest, BackupResult, run_backup
from deltavault.objects.walk import walk
from deltavault.progress import NullReporter
from deltavault.repository.repository import Repository
from tests.conftest import Cli
from tests.hostileutil import PATH_MAX, deltavault, lines, make_deep


@pytest.mark.slow
def test_a_depth_5000_tree_past_path_max_backs_up_with_few_open_files(shared_dir: Path, cli: Cli) -> None:
    """No path is resolved, so PATH_MAX does not apply; no recursion, so depth does not; and
    the walk holds a bounded number of directory fds, so it runs under a 256-file limit.
    (Restoring this tree is the restore side's part of issue #12, not tested here.)"""
    src = shared_dir / "src"
    src.mkdir()
    rel = make_deep(src, 5000, b"at the bottom\n")
    assert len(os.fsencode(src)) + 1 + len(rel) > 2 * PATH_MAX
    assert deltavault(cli, "init").returncode == 0
    r = deltavault(cli, "backup", str(src), nofile=256)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = lines(r.stdout, "summary")[-1]
    assert summary["problems"] == [] and summary["dirs"] == 5001 and summary["files_new"] == 1
    ls = deltavault(cli, "ls", "latest")
    assert ls.returncode == 0, ls.stderr[-2000:]
    nodes = {bytes.fromhex(n["path_hex"]): n for n in lines(ls.stdout, "node")}
    leaf = nodes[b"src/" + rel]
    assert leaf["node_type"] == "f" and leaf["size"] == len(b"at the bottom\n")
    assert len(nodes) == 5002
    check = deltavault(cli, "check", "--read-data")
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    # An unchanged rerun still finds everything, from the catalog.
    again = deltavault(cli, "backup", str(src), nofile=256)
    assert again.returncode == 0, again.stderr[-2000:]
    s2 = lines(again.stdout, "summary")[-1]
    assert s2["change_source"] == "catalog" and s2["files_new"] == 0 and s2["problems"] == []
    assert s2["files_unmodified"] + s2["files_changed"] == 1  # changed: still in the racy window


class _OnFirstRead(NullReporter):
    """Runs ``action`` once, right after the first file is read: a change made while the
    walk is deep inside the tree, at a known point."""

    def __init__(self, action: object) -> None:
        self.action = action

    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
        if self.action is not None:
            act, self.action = self.action, None
            act()  # type: ignore[operator]


def _chain(src: Path) -> Path:
    """src/a/b/c/d/e/f/file, with an entry sorted after each directory ("z")."""
    deep = src / "a" / "b" / "c" / "d" / "e" / "f"
    deep.mkdir(parents=True)
    (deep / "file").write_text("deep\n")
    for d in [src / "a", src / "a" / "b"]:
        (d / "z").write_text(f"after {d.name}\n")
    return deep


def _paths(repo: Repository, res: BackupResult) -> set[bytes]:
    assert res.snapshot.tree is not None
    return {p for p, _ in walk(repo, res.snapshot.tree)}


def test_ancestors_closed_for_depth_are_found_again_after_a_move(tmp_path: Path, repo: Repository,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Deeper than MAX_OPEN_DIRS, the walk closes ancestors' fds and reopens them through
    "..". Here c is moved out of b while the walk is in f: ".." of c is no longer b, so b
    is looked up again from the source and checked, and b's later entry is still read."""
    monkeypatch.setattr(files_mod, "MAX_OPEN_DIRS", 2)
    src = tmp_path / "src"
    _chain(src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = run_backup(repo, BackupRequest(paths=[str(src)]),
                     _OnFirstRead(lambda: os.rename(src / "a" / "b" / "c", elsewhere / "c")))
    assert res.problems == []
    got = _paths(repo, res)
    assert {b"src/a/b/c/d/e/f/file", b"src/a/b/z", b"src/a/z"} <= got


def test_an_ancestor_moved_away_is_reported_and_the_walk_goes_on(tmp_path: Path, repo: Repository,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_mod, "MAX_OPEN_DIRS", 2)
    src = tmp_path / "src"
    _chain(src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def move() -> None:
        os.rename(src / "a" / "b" / "c", elsewhere / "c")
        os.rename(src / "a" / "b", src / "a" / "b2")

    res = run_backup(repo, BackupRequest(paths=[str(src)]), _OnFirstRead(move))
    assert [(p.path.rsplit("/", 1)[-1], p.kind, p.partial) for p in res.problems] == [("b", "changed", True)]
    assert "moved during the backup" in res.problems[0].message
    got = _paths(repo, res)
    assert b"src/a/b/c/d/e/f/file" in got and b"src/a/b/z" not in got  # b's rest was not readable
    assert b"src/a/z" in got  # a was found again from the source, checked, and finished
