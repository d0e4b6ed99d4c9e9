"""Sync of trees 5,000 directories deep, past PATH_MAX, under a 256-file limit, locally and
pushed through a real sshd; directories closed for depth that get their metadata late or
are moved in DST meanwhile (split from test_sync_hostile.py)."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import deltavault.sync.local.dirs as dirs_mod
from deltavault.progress import NullReporter
from deltavault.sync.local.engine import Syncer
from deltavault.sync.options import SyncOptions
from tests.conftest import needs_root, needs_tools
from tests.hostileutil import make_deep
from tests.integration.sync.conftest import REMOTE, summary, write
from tests.integration.sync.test_sync_hostile import no_sshd, sync
from tests.integration.sync.test_sync_tree import stat_map
from tests.sshd import Server
from tests.treeutil import remove_tree

pytestmark = [needs_root(), pytest.mark.root, needs_tools("rsync", "setfacl", "mount")]

PATH_MAX = 4096


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


def _synced_then_changed(src: Path, dst: Path) -> None:
    """_chain synced to DST, then a and b's z and the deep file changed in SRC."""
    _chain(src)
    assert Syncer(src, dst, SyncOptions(processes=1)).run().problems == []
    for z in (src / "a" / "z", src / "a" / "b" / "z", src / "a/b/c/d/e/f/file"):
        write(z, b"changed " + z.name.encode())


def test_a_closed_directory_moved_in_dst_is_found_again_by_name_and_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deep in the walk, DST's c is moved out of b: ".." of c is not b any more, so b is
    looked up again from DST's root, each level checked, and b's later entry is written."""
    monkeypatch.setattr(dirs_mod, "MAX_OPEN_DIRS", 2)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _synced_then_changed(src, dst)
    r = Syncer(src, dst, SyncOptions(processes=1),
               _OnFirstFile(lambda: os.rename(dst / "a" / "b" / "c", dst / "c-moved"))).run()
    assert r.problems == []
    assert (dst / "a" / "b" / "z").read_bytes() == b"changed z" == (dst / "a" / "z").read_bytes()


def test_a_closed_directory_moved_away_in_dst_is_reported_and_nothing_is_written_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirs_mod, "MAX_OPEN_DIRS", 2)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _synced_then_changed(src, dst)

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
