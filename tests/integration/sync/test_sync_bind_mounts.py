"""Sync where bind mounts make trees overlap: SRC inside DST, DST inside SRC, a mount in
DST showing part of SRC, SRC mounted inside itself; locally and, where the agent writes
DST, through a real sshd (split from test_sync_hostile.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_root, needs_tools
from tests.integration.sync.conftest import summary, write
from tests.integration.sync.test_sync_hostile import no_sshd, run, sync

pytestmark = [needs_root(), pytest.mark.root, needs_tools("rsync", "setfacl", "mount")]


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
