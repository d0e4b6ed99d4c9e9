"""fs/trusted.py: a directory path walked one name at a time, following only our own and
root's symlinks (relative and absolute targets, "..", loops), making what is missing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from deltavault.fs.dirfd import identity
from deltavault.fs.trusted import UntrustedLink, open_dir_trusted
from deltavault.testing.hostile import NOBODY
from tests.conftest import needs_root


def same(fd: int, path: Path) -> bool:
    try:
        return identity(os.fstat(fd)) == identity(path.stat())
    finally:
        os.close(fd)


def test_our_symlinks_are_followed_relative_absolute_and_through_dotdot(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "rel").symlink_to("a/b")
    (tmp_path / "abs").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "up").symlink_to("..")
    assert same(open_dir_trusted(os.fsencode(tmp_path / "rel")), tmp_path / "a" / "b")
    assert same(open_dir_trusted(os.fsencode(tmp_path / "abs" / "b" / "..")), tmp_path / "a")
    assert same(open_dir_trusted(os.fsencode(tmp_path / "a" / "up" / "abs" / "b")), tmp_path / "a" / "b")
    monkeypatch.chdir(tmp_path)
    assert same(open_dir_trusted(b"rel/../b"), tmp_path / "a" / "b")  # ".." of where the link led


def test_missing_directories_are_made_and_loops_and_files_refused(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "file").write_bytes(b"x")
    assert same(open_dir_trusted(os.fsencode(tmp_path / "x" / "y"), create=True), tmp_path / "x" / "y")
    with pytest.raises(FileNotFoundError):
        open_dir_trusted(os.fsencode(tmp_path / "z"))
    with pytest.raises(OSError) as got:
        open_dir_trusted(os.fsencode(tmp_path / "loop"))
    assert got.value.errno == errno.ELOOP
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        open_dir_trusted(os.fsencode(tmp_path / "file"))
    with pytest.raises(NotADirectoryError, match="a parent is not a directory"):
        open_dir_trusted(os.fsencode(tmp_path / "file" / "sub"), create=True)


@needs_root()
@pytest.mark.root
def test_a_symlink_of_another_user_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "theirs").symlink_to(tmp_path / "real")
    os.lchown(tmp_path / "theirs", NOBODY, NOBODY)
    (tmp_path / "ours").symlink_to("theirs")
    for via in ("theirs", "ours", "theirs/x"):
        with pytest.raises(UntrustedLink) as got:
            open_dir_trusted(os.fsencode(tmp_path / via), create=True)
        assert (got.value.uid, got.value.name) == (NOBODY, b"theirs")
    assert os.listdir(tmp_path / "real") == []
