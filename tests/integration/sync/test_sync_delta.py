"""Delta updates of big files changed in place: only changed pages are written, into a
reflink clone (xfs, btrfs) renamed over the old file, or with --inplace into the file."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import needs_root, needs_tools
from tests.integration.sync.conftest import dv, nothing_to_do, summary, write

pytestmark = [needs_root(), pytest.mark.root]
MiB = 1 << 20


def scribble(path: Path, pages: list[int]) -> int:
    """Overwrite whole 4 KiB pages in place (as a database does); returns bytes changed."""
    with open(path, "r+b") as f:
        for pg in pages:
            f.seek(pg * 4096)
            f.write(os.urandom(4096))
    return len(pages) * 4096


def shared_extents(path: Path) -> bool:
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True, check=True).stdout
    return "shared" in out


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
@needs_tools("mkfs.xfs", "mkfs.btrfs", "filefrag")
def test_delta_writes_only_changed_pages_into_a_clone(tmp_path: Path, loopfs, fstype: str) -> None:
    mnt = loopfs(fstype, 300)
    src, dst = mnt / "src", mnt / "dst"
    write(src / "db.sqlite", os.urandom(24 * MiB))
    write(src / "small", b"small file")
    assert dv("sync", str(src), str(dst)).returncode == 0
    old_ino = os.stat(dst / "db.sqlite").st_ino
    os.link(dst / "db.sqlite", mnt / "old-version")  # keeps the old blocks alive to compare
    rng = random.Random(7)
    pages = sorted(rng.sample(range(24 * MiB // 4096), 60))
    changed = scribble(src / "db.sqlite", pages)
    with open(src / "db.sqlite", "ab") as f:  # and it grew by 10000 bytes
        f.write(os.urandom(10000))
    log = tmp_path / "log"
    p = dv("--json", "sync", "--log", str(log), str(src), str(dst))
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary(p)
    assert s["files_delta"] == 1 and s["delta_reflinked"] == 1
    assert s["delta_bytes_written"] == changed + 10000
    assert s["delta_file_bytes"] == 24 * MiB + 10000
    assert nothing_to_do(src, dst) == ""
    assert os.stat(dst / "db.sqlite").st_ino != old_ino  # a new file renamed into place
    os.sync()
    assert shared_extents(dst / "db.sqlite")  # unchanged blocks are shared with the old version
    row = next(ln.split("\t") for ln in log.read_text().splitlines() if ln.endswith("db.sqlite\t-"))
    assert row[1] == "delta" and int(row[3]) == changed + 10000


@needs_tools("mkfs.ext4")
def test_without_reflink_delta_copies_whole_unless_inplace(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"  # tmp_path: ext4 here, which cannot clone
    write(src / "vm.img", os.urandom(16 * MiB))
    assert dv("sync", str(src), str(dst)).returncode == 0
    changed = scribble(src / "vm.img", [3, 4, 5, 1000, 4095])
    s = summary(dv("--json", "sync", str(src), str(dst)))
    assert s["files_delta"] == 0 and s["files_updated"] == 1 and s["bytes_copied"] == 16 * MiB
    changed = scribble(src / "vm.img", [0, 2000])
    ino = os.stat(dst / "vm.img").st_ino
    s = summary(dv("--json", "sync", "--inplace", str(src), str(dst)))
    assert s["files_delta"] == 1 and s["delta_bytes_written"] == changed and s["delta_reflinked"] == 0
    assert os.stat(dst / "vm.img").st_ino == ino
    assert nothing_to_do(src, dst) == ""


def test_shrunk_file_and_verify_through_delta(tmp_path: Path, loopfs) -> None:
    mnt = loopfs("xfs", 300)
    src, dst = mnt / "src", mnt / "dst"
    data = bytearray(os.urandom(12 * MiB))
    write(src / "f", bytes(data))
    assert dv("sync", str(src), str(dst)).returncode == 0
    del data[9 * MiB:]
    data[5000:5010] = b"0123456789"
    write(src / "f", bytes(data))
    s = summary(dv("--json", "sync", "--verify", str(src), str(dst)))
    assert s["files_delta"] == 1 and s["delta_bytes_written"] == 4096 and s["files_verified"] == 1
    assert (dst / "f").read_bytes() == bytes(data)


def test_hardlinked_destination_is_not_written_in_place(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "f", os.urandom(8 * MiB))
    assert dv("sync", str(src), str(dst)).returncode == 0
    os.link(dst / "f", tmp_path / "outside-link")
    scribble(src / "f", [10])
    s = summary(dv("--json", "sync", "--inplace", str(src), str(dst)))
    assert s["files_updated"] == 1  # writing in place would change the other link too
    assert (tmp_path / "outside-link").read_bytes() != (src / "f").read_bytes()
