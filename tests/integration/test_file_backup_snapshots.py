"""File backups of the same data seen elsewhere: the catalog still matches across another
mount point and btrfs snapshots with their own device ids, and a btrfs snapshot the backup
takes and removes itself (split from test_file_backup.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltavault.repository.repository import Repository
from tests.conftest import needs_root, needs_tools
from tests.integration.test_file_backup import backup, restore, settle
from tests.loopdev import fresh_fs
from tests.treeutil import manifest


@needs_root()
def test_catalog_survives_another_mount_point(tmp_path: Path, repo: Repository) -> None:
    """The same data seen at another path (a snapshot mounted elsewhere) is not re-read."""
    src = tmp_path / "data"
    src.mkdir()
    for i in range(50):
        (src / f"f{i}").write_bytes(os.urandom(10_000))
    backup(repo, src, logical_paths=["/srv/data"])
    mnt = tmp_path / "snapshot-mounted-elsewhere"
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(mnt)], check=True)
    try:
        (src / "f3").write_bytes(os.urandom(10_000))
        res = backup(repo, mnt, logical_paths=["/srv/data"])
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert res.change_source == "catalog"
    assert (res.stats.files_changed, res.stats.files_unmodified) == (1, 49)


@pytest.fixture
def btrfs_mount(tmp_path: Path) -> Iterator[Path]:
    with fresh_fs(tmp_path, "200M", "mkfs.btrfs", "-q", "-f") as mnt:
        yield mnt


@needs_root()
@needs_tools("mkfs.btrfs", "btrfs", "losetup")
def test_catalog_survives_a_snapshot_with_another_device_id(btrfs_mount: Path, repo: Repository) -> None:
    """Each btrfs snapshot is its own device (st_dev) and lives at its own path; the
    catalog still matches, so only the changed file is read."""
    vol = btrfs_mount / "vol"
    subprocess.run(["btrfs", "subvolume", "create", str(vol)], check=True, capture_output=True)
    for i in range(40):
        (vol / f"f{i}").write_bytes(os.urandom(20_000))
    settle()
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(vol), str(btrfs_mount / "snap1")],
                   check=True, capture_output=True)
    first = backup(repo, btrfs_mount / "snap1", logical_paths=["/srv/data"])
    (vol / "f7").write_bytes(os.urandom(20_000))
    settle()
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(vol), str(btrfs_mount / "snap2")],
                   check=True, capture_output=True)
    assert (btrfs_mount / "snap1").stat().st_dev != (btrfs_mount / "snap2").stat().st_dev
    second = backup(repo, btrfs_mount / "snap2", logical_paths=["/srv/data"])
    assert first.stats.files_new == 40
    assert second.change_source == "catalog"
    assert (second.stats.files_changed, second.stats.files_unmodified) == (1, 39)
    assert second.stats.bytes_read == 20_000
    assert second.snapshot.paths == ["/srv/data"]


@needs_root()
@needs_tools("mkfs.btrfs", "btrfs", "losetup")
def test_backup_from_a_btrfs_snapshot_it_takes_and_removes(btrfs_mount: Path, repo: Repository) -> None:
    vol = btrfs_mount / "vol"
    subprocess.run(["btrfs", "subvolume", "create", str(vol)], check=True, capture_output=True)
    for i in range(10):
        (vol / f"f{i}").write_bytes(os.urandom(5000))
    settle()

    def subvolumes() -> list[str]:
        out = subprocess.run(["btrfs", "subvolume", "list", str(btrfs_mount)], check=True,
                             capture_output=True, text=True).stdout
        return [line.split()[-1] for line in out.splitlines()]

    first = backup(repo, vol, snapshot="btrfs")
    assert first.snapshots and first.snapshots[0]["kind"] == "btrfs"
    assert first.snapshot.paths == [str(vol)]
    assert subvolumes() == ["vol"]  # the snapshot is gone again
    (vol / "f2").write_bytes(os.urandom(5000))
    second = backup(repo, vol, snapshot="btrfs")
    assert second.change_source == "catalog"
    assert (second.stats.files_changed, second.stats.files_unmodified) == (1, 9)
    assert subvolumes() == ["vol"]
    out = btrfs_mount.parent / "out"
    restore(repo, second, out)
    assert manifest(out / "vol") == manifest(vol)
