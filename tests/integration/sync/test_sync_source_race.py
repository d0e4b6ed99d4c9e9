"""Sync of a SRC that another process changes between the listing of an entry and its
read: each change is made at a known point, by wrapping the call the sync makes next (no
timing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import deltavault.sync.sender.source as source_mod
from deltavault.sync.local.engine import Syncer
from deltavault.sync.options import SyncOptions
from tests.hostileutil import before_call
from tests.integration.sync.conftest import write


def test_a_hard_link_renamed_over_before_its_copy_does_not_lend_its_content_to_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """b, c and d are one file. b (the name copied; c and d are linked to its copy) is
    replaced by another file, itself with two links, after the listing: the old sync copied
    the new file and linked c and d to it, so DST/c and DST/d held content SRC/c and SRC/d never had. Now b is not
    copied (reported), nor are c and d linked to anything."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "b", b"original content of the linked file\n")
    os.link(src / "b", src / "c")
    os.link(src / "b", src / "d")
    intruder = write(tmp_path / "intruder", b"the intruder's content\n")
    os.link(intruder, tmp_path / "intruder-kept")  # linked too: its copy is taken as the group's
    before_call(monkeypatch, source_mod, "open_source", b"b", lambda: os.rename(intruder, src / "b"))
    res = Syncer(src, dst, SyncOptions(processes=1)).run()
    for name in ("c", "d"):
        assert not (dst / name).exists() or (dst / name).read_bytes() == (src / name).read_bytes(), name
    by_path = {p.path: p for p in res.problems}
    assert sorted(by_path) == ["b", "c", "d"]
    assert by_path["b"].kind == "changed" and "replaced by another file" in by_path["b"].message


def test_a_directory_swapped_for_a_symlink_to_a_private_one_before_it_is_entered_is_not_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Already so: the directory is opened from its parent's fd with O_NOFOLLOW."""
    src, dst, private = tmp_path / "src", tmp_path / "dst", tmp_path / "private"
    write(src / "d" / "mine", b"mine\n")
    write(private / "secret", b"root only\n", 0o600)
    private.chmod(0o700)

    def swap() -> None:
        os.rename(src / "d", tmp_path / "d-aside")
        os.symlink(private, src / "d")

    before_call(monkeypatch, source_mod, "open_dir_at", b"d", swap)
    res = Syncer(src, dst, SyncOptions(processes=1)).run()
    assert [(p.path, p.kind) for p in res.problems] == [("d", "changed")]
    assert not (dst / "d" / "secret").exists()
