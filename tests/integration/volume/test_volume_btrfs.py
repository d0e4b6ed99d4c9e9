"""Image files on btrfs: changes from FIEMAP between two read-only snapshots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import needs_root, needs_tools
from tests.integration.volume.conftest import (
    Vol,
    ext4_expected,
    fill_tree,
    loop,
    make_ext4,
    mounted,
    run,
    sha256,
)

pytestmark = [needs_root(), needs_tools("mkfs.btrfs", "btrfs", "losetup", "chattr"), pytest.mark.root]
MiB = 1 << 20


@pytest.fixture
def btrfs(tmp_path: Path, stack) -> Path:  # type: ignore[no-untyped-def]
    img = tmp_path / "btrfs.img"
    with open(img, "wb") as f:
        f.truncate(400 * MiB)
    run("mkfs.btrfs", "-q", "-f", str(img))
    dev = stack.enter_context(loop(img))
    mnt = stack.enter_context(mounted(dev, tmp_path / "b"))
    run("btrfs", "subvolume", "create", str(mnt / "vms"))
    return mnt / "vms"


def _scribble(path: Path, writes: list[tuple[int, int]]) -> None:
    with open(path, "r+b") as f:
        for off, ln in writes:
            f.seek(off)
            f.write(os.urandom(ln))
        os.fsync(f.fileno())


@pytest.mark.parametrize("nocow", [False, True], ids=["cow", "nodatacow"])
def test_btrfs_snapshots_find_changes(vol: Vol, btrfs: Path, nocow: bool) -> None:
    image = btrfs / "disk.img"
    image.touch()
    if nocow:
        run("chattr", "+C", str(image))  # VM images usually are: writes go in place
    with open(image, "r+b") as f:
        f.truncate(64 * MiB)
        for i in range(0, 64, 3):
            f.seek(i * MiB)
            f.write(os.urandom(MiB))
    first = vol.backup(image, cbt="btrfs")
    assert first.report.change_source == "block-digests"
    snaps = sorted((btrfs / ".deltavault-snapshots").iterdir())
    assert len(snaps) == 1
    _scribble(image, [(5 * MiB + 4096, 8192), (40 * MiB, 300_000), (63 * MiB, 4096)])
    second = vol.backup(image, cbt="btrfs")
    rep = second.report
    assert rep.change_source == "btrfs", rep.rejected
    assert rep.bytes_read < 4 * MiB
    assert rep.pages_changed >= (8192 + 300_000 + 4096) // 4096
    assert sha256(vol.restore(second.snapshot_id)) == sha256(image)
    # Only the newest snapshot is kept.
    assert [p.name for p in (btrfs / ".deltavault-snapshots").iterdir()] != [snaps[0].name]
    assert len(list((btrfs / ".deltavault-snapshots").iterdir())) == 1


def test_btrfs_lost_snapshot_falls_back(vol: Vol, btrfs: Path) -> None:
    image = btrfs / "disk.img"
    with open(image, "wb") as f:
        f.write(os.urandom(16 * MiB))
    vol.backup(image, cbt="btrfs")
    (snap,) = (btrfs / ".deltavault-snapshots").iterdir()
    run("btrfs", "subvolume", "delete", str(snap))
    _scribble(image, [(MiB, 4096)])
    r = vol.backup(image, cbt="btrfs")
    assert r.report.change_source == "block-digests"
    assert "gone" in r.report.rejected[0]["reason"]
    assert sha256(vol.restore(r.snapshot_id)) == sha256(image)
    # Resized: the snapshot is there, but the ranges cannot be compared.
    with open(image, "ab") as f:
        f.write(os.urandom(MiB))
    r2 = vol.backup(image, cbt="btrfs")
    assert r2.report.change_source == "block-digests"
    assert any("resized" in n for n in r2.report.notes)
    assert sha256(vol.restore(r2.snapshot_id)) == sha256(image)


def test_btrfs_image_holding_a_mounted_file_system(vol: Vol, btrfs: Path, tmp_path: Path) -> None:
    """The image is loop-mounted and changed through ext4: snapshots give a consistent copy."""
    image = make_ext4(btrfs / "fs.img", 64, fill_tree(tmp_path / "src", seed=21))
    vol.backup(image, cbt="btrfs")
    with loop(image) as dev:
        with mounted(dev, tmp_path / "m") as mnt:
            (mnt / "new.bin").write_bytes(os.urandom(2 * MiB))
            (mnt / "d0" / "f0.bin").unlink()
        expected = ext4_expected(image, 64 * MiB)
    r = vol.backup(image, cbt="btrfs")
    assert r.report.change_source == "btrfs", r.report.rejected
    assert sha256(vol.restore(r.snapshot_id)) == expected


def test_switching_away_from_btrfs_deletes_the_last_snapshot(vol: Vol, btrfs: Path) -> None:
    image = btrfs / "disk.img"
    with open(image, "wb") as f:
        f.write(os.urandom(16 * MiB))
    vol.backup(image, cbt="btrfs")
    assert len(list((btrfs / ".deltavault-snapshots").iterdir())) == 1
    _scribble(image, [(MiB, 4096)])
    r = vol.backup(image, cbt="digests")
    assert r.report.change_source == "block-digests" and not r.report.warnings
    # a kept snapshot would pin every block the image rewrites from now on
    assert list((btrfs / ".deltavault-snapshots").iterdir()) == []
    assert sha256(vol.restore(r.snapshot_id)) == sha256(image)
