"""ext4 volumes: built with mke2fs -d, changed through a real mount on a loop device."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from deltavault.backup.volume.options import VolumeResult
from tests.conftest import needs_root, needs_tools
from tests.integration.volume.conftest import (
    Vol,
    ext4_expected,
    fill_tree,
    fsck_clean,
    loop,
    make_ext4,
    mounted,
    run,
    sha256,
)

pytestmark = [needs_root(), needs_tools("mke2fs", "e2fsck", "dumpe2fs", "losetup"), pytest.mark.root]
SIZE_MB = 64


def _changes(mnt: Path) -> None:
    """In place, appended, new, deleted and renamed files: every kind of change."""
    f = mnt / "d0" / "f0.bin"
    with open(f, "r+b") as h:
        h.seek(4096 * 3)
        h.write(os.urandom(4096 * 2))
    with open(mnt / "d1" / "f1.bin", "ab") as h:
        h.write(os.urandom(70_000))
    (mnt / "new").mkdir()
    (mnt / "new" / "x.bin").write_bytes(os.urandom(500_000))
    (mnt / "d2" / "f2.bin").unlink()
    (mnt / "d3" / "f3.bin").rename(mnt / "d3" / "moved.bin")


def _assert_report(r: VolumeResult, source: str) -> None:
    rep = r.report
    assert rep.change_source == source, (rep.change_source, rep.rejected, rep.notes)
    assert rep.file_system == "ext4"


def test_full_incremental_restore(vol: Vol, tmp_path: Path) -> None:
    img = make_ext4(tmp_path / "v.img", SIZE_MB, fill_tree(tmp_path / "src", seed=1))
    size = img.stat().st_size
    first = vol.backup(img)
    assert first.report.change_source == "block-digests"
    assert first.report.rejected[0]["source"] == "fs-digests"
    # A fresh image: free space is holes, so the restore is identical byte for byte.
    assert sha256(vol.restore(first.snapshot_id)) == sha256(img)

    with loop(img) as dev, mounted(dev, tmp_path / "m") as mnt:
        _changes(mnt)
    expected = ext4_expected(img, size)
    second = vol.backup(img)
    _assert_report(second, "fs-digests")
    rep = second.report
    # Only the changed files' data and metadata were read, not the whole volume.
    assert rep.bytes_read < size / 4
    assert 0 < rep.blocks_changed < rep.blocks_total
    restored = vol.restore(second.snapshot_id)
    assert sha256(restored) == expected
    fsck_clean(restored)
    # The first snapshot is still intact after the second run.
    assert sha256(vol.restore(first.snapshot_id)) != expected


def test_trimmed_source_restores_identically(vol: Vol, tmp_path: Path) -> None:
    """With free space trimmed (zeros), skipping it loses nothing: sha256-equal."""
    img = make_ext4(tmp_path / "v.img", SIZE_MB, fill_tree(tmp_path / "src", seed=2))
    vol.backup(img)
    with loop(img) as dev, mounted(dev, tmp_path / "m") as mnt:
        _changes(mnt)
        os.sync()  # blocks freed in an uncommitted transaction are not trimmed
        run("fstrim", str(mnt))
    r = vol.backup(img)
    _assert_report(r, "fs-digests")
    assert sha256(vol.restore(r.snapshot_id)) == sha256(img)


def test_free_space_read_is_exact_without_trimming(vol: Vol, tmp_path: Path) -> None:
    img = make_ext4(tmp_path / "v.img", SIZE_MB, fill_tree(tmp_path / "src", seed=3))
    vol.backup(img, free_space="read")
    with loop(img) as dev, mounted(dev, tmp_path / "m") as mnt:
        _changes(mnt)
    r = vol.backup(img, free_space="read")
    assert r.report.bytes_free_skipped == 0
    assert sha256(vol.restore(r.snapshot_id)) == sha256(img)


def test_changes_no_metadata_vouches_for_are_read(vol: Vol, tmp_path: Path) -> None:
    """Free space (with --free-space read) and the tail past a smaller file system change
    without any inode changing: a temporary file written and deleted, a raw write past the
    file system's end. Neither may be missed."""
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.write(os.urandom(SIZE_MB << 20))  # old data everywhere: no holes to give changes away
    # A file system 8 MiB smaller than the volume: the tail lies past it.
    run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-E", "nodiscard",
        "-d", str(fill_tree(tmp_path / "src", seed=10)), str(img), str((SIZE_MB - 8) * 256))
    first = vol.backup(img, free_space="read")
    with loop(img) as dev, mounted(dev, tmp_path / "m") as mnt:
        (mnt / "tmp.bin").write_bytes(os.urandom(3 << 20))
        os.sync()
        (mnt / "tmp.bin").unlink()
    with open(img, "r+b") as f:
        f.seek((SIZE_MB - 4) << 20)
        f.write(os.urandom(70_000))
    r = vol.backup(img, free_space="read")
    _assert_report(r, "fs-digests")
    assert r.report.pages_changed * 4096 >= (3 << 20) + 70_000
    assert sha256(vol.restore(r.snapshot_id)) == sha256(img)
    assert first.snapshot_id != r.snapshot_id


def test_block_device_source_and_target(vol: Vol, tmp_path: Path) -> None:
    img = make_ext4(tmp_path / "v.img", SIZE_MB, fill_tree(tmp_path / "src", seed=4))
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.write(os.urandom(1 << 20) * (SIZE_MB + 1))  # garbage everywhere, and larger
    with loop(img) as dev:
        vol.backup(dev)
        with mounted(dev, tmp_path / "m") as mnt:
            _changes(mnt)
        expected = ext4_expected(img, SIZE_MB << 20)
        r = vol.backup(dev)
        _assert_report(r, "fs-digests")
    with loop(target) as tdev:
        vol.restore(r.snapshot_id, Path(tdev))
    assert sha256(target, SIZE_MB << 20) == expected
    shutil.copyfile(target, tmp_path / "check.img")
    os.truncate(tmp_path / "check.img", SIZE_MB << 20)
    fsck_clean(tmp_path / "check.img")


def test_frozen_mounted_file_system(vol: Vol, tmp_path: Path) -> None:
    """A mounted file system is read consistently when frozen; unfrozen, its metadata is
    not trusted (journal in use) and everything is read."""
    img = make_ext4(tmp_path / "v.img", SIZE_MB, fill_tree(tmp_path / "src", seed=5))
    with loop(img) as dev, mounted(dev, tmp_path / "m") as mnt:
        run("fsfreeze", "-f", str(mnt))
        try:
            vol.backup(dev)
        finally:
            run("fsfreeze", "-u", str(mnt))
        _changes(mnt)
        os.sync()
        live = vol.backup(dev)
        assert live.report.change_source == "block-digests"
        assert any("journal" in x["reason"] for x in live.report.rejected)
        assert any("mounted read-write" in w for w in live.report.warnings)
        (mnt / "after.bin").write_bytes(os.urandom(100_000))
        run("fsfreeze", "-f", str(mnt))
        try:
            expected = ext4_expected(img, SIZE_MB << 20, dev)
            frozen = vol.backup(dev)
        finally:
            run("fsfreeze", "-u", str(mnt))
    # The unfrozen run left no metadata digests (untrusted): the frozen one read everything too.
    assert frozen.report.change_source == "block-digests"
    assert sha256(vol.restore(frozen.snapshot_id)) == expected
    third = vol.backup(img)
    _assert_report(third, "fs-digests")


def test_lost_local_state_and_recreated_file_system(vol: Vol, tmp_path: Path) -> None:
    img = make_ext4(tmp_path / "v.img", SIZE_MB, fill_tree(tmp_path / "src", seed=6))
    vol.backup(img)
    vol.lose_local_state()
    with loop(img) as dev, mounted(dev, tmp_path / "m") as mnt:
        _changes(mnt)
    # The digests live in the repository: losing the local cache costs only a download.
    r = vol.backup(img)
    _assert_report(r, "fs-digests")
    assert r.report.bytes_downloaded > 0
    # A new file system on the same image: the digests belong to the old one.
    make_ext4(img, SIZE_MB, fill_tree(tmp_path / "src2", seed=7))
    r2 = vol.backup(img)
    assert r2.report.change_source == "block-digests"
    assert "re-created" in r2.report.rejected[0]["reason"]
    assert sha256(vol.restore(r2.snapshot_id)) == ext4_expected(img, SIZE_MB << 20)


def test_digests_mode_keeps_no_checkpoint_and_verify_cbt(vol: Vol, tmp_path: Path) -> None:
    img = make_ext4(tmp_path / "v.img", SIZE_MB, fill_tree(tmp_path / "src", seed=8))
    vol.backup(img, cbt="digests")
    r = vol.backup(img)
    assert r.report.rejected[0] == {"source": "fs-digests",
                                    "reason": "the previous snapshot left no checkpoint for this source"}
    with loop(img) as dev, mounted(dev, tmp_path / "m") as mnt:
        _changes(mnt)
    r = vol.backup(img, verify_cbt=8)
    _assert_report(r, "fs-digests")
    assert r.report.verify_cbt is not None and r.report.verify_cbt["pages_checked"] > 0
    assert r.report.verify_cbt["pages_mismatched"] == 0


def test_verify_cbt_catches_a_change_behind_the_file_systems_back(vol: Vol, tmp_path: Path) -> None:
    """Data written straight to the device (not through the file system) is invisible to
    metadata digests; --verify-cbt samples unchanged-looking blocks and falls back."""
    img = make_ext4(tmp_path / "v.img", SIZE_MB, fill_tree(tmp_path / "src", seed=9, files=40))
    first = vol.backup(img, block_size=64 * 1024)
    # Overwrite the data of every file, bypassing the file system (mtime stays).
    with loop(img) as dev, mounted(dev, tmp_path / "m", "-o", "ro") as mnt:
        extents = run("filefrag", "-e", "-b4096", *[str(p) for p in sorted(mnt.rglob("*.bin"))])
    blocks = []
    for line in extents.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) > 5 and parts[0].isdigit():
            first_phys = int(parts[3].rstrip("."))
            blocks.append(first_phys)
    assert blocks
    with open(img, "r+b") as f:
        for b in blocks:
            f.seek(b * 4096)
            f.write(b"\xa5" * 4096)
    r = vol.backup(img, block_size=64 * 1024, verify_cbt=10_000)
    assert r.report.verify_cbt is not None and r.report.verify_cbt["pages_mismatched"] > 0
    assert r.report.change_source == "block-digests"
    assert any("verify-cbt" in x["reason"] for x in r.report.rejected)
    assert sha256(vol.restore(r.snapshot_id)) == ext4_expected(img, SIZE_MB << 20)
    assert first.snapshot_id != r.snapshot_id


def test_restore_refuses_mounted_or_small_devices(vol: Vol, tmp_path: Path) -> None:
    from deltavault.errors import UsageError

    img = make_ext4(tmp_path / "v.img", SIZE_MB, fill_tree(tmp_path / "src", seed=12))
    r = vol.backup(img)
    small = tmp_path / "small.img"
    with open(small, "wb") as f:
        f.truncate((SIZE_MB - 1) << 20)
    other = make_ext4(tmp_path / "other.img", SIZE_MB)
    with loop(small) as sdev, pytest.raises(UsageError, match="needs"):
        vol.restore(r.snapshot_id, Path(sdev))
    from deltavault.objects.volumes import load_manifest
    from deltavault.restore.volume import VolumeRestoreOptions, VolumeRestorer

    assert r.snapshot.volume is not None
    manifest = load_manifest(vol.repo, r.snapshot.volume)
    with loop(other) as odev, pytest.raises(UsageError, match="--overwrite"):
        VolumeRestorer(vol.repo, manifest, odev, VolumeRestoreOptions()).run()
    with loop(other) as odev, mounted(odev, tmp_path / "o"), pytest.raises(UsageError, match="mounted"):
        vol.restore(r.snapshot_id, Path(odev))
    assert small.read_bytes() == bytes((SIZE_MB - 1) << 20)  # nothing written before refusing
    fsck_clean(other)



def _version(img: Path, name: str) -> int:
    out = subprocess.run(["debugfs", "-R", f"stat /{name}", str(img)], capture_output=True, text=True,
                         check=True).stdout
    return int(re.search(r"Version: (0x[0-9a-f]+)", out).group(1), 16)  # type: ignore[union-attr]


def _set_inode(img: Path, name: str, **fields: str) -> None:
    for field, value in fields.items():
        run("debugfs", "-w", "-R", f"sif /{name} {field} {value}", str(img))


def test_a_file_rewritten_in_the_second_of_the_capture_is_read_again(vol: Vol, tmp_path: Path) -> None:
    """The kernel stamps times at its clock's granularity (a second in 128-byte inodes)
    and leaves the inode alone when a write keeps its times (nor is i_version bumped while
    nobody has asked for it): a file written in the second the volume was captured, then
    overwritten in place in that same second, has the very inode it had, and other data.
    Its digest vouched for the old blocks in every later run: the change was missed for
    good. Now the digest of a file changed within a second of the newest time on the volume
    matches nothing, and the next run reads it. The same-second writes are made without
    timing: after the first, the file's times are set (debugfs) to the second of the capture
    (the superblock's last write, at the unmount); after the second, its times and i_version
    are set back to what they were, as the kernel leaves them within one tick."""
    img = make_ext4(tmp_path / "v.img", SIZE_MB, fill_tree(tmp_path / "src", seed=12), "-I", "128")
    size = img.stat().st_size
    with loop(img) as dev, mounted(dev, tmp_path / "m") as mnt:
        (mnt / "hot.bin").write_bytes(os.urandom(256 * 1024))
    with open(img, "rb") as f:
        f.seek(1024 + 48)
        captured = f"@{int.from_bytes(f.read(4), 'little')}"  # s_wtime
    _set_inode(img, "hot.bin", ctime=captured, mtime=captured)
    version = hex(_version(img, "hot.bin"))
    vol.backup(img)
    with loop(img) as dev, mounted(dev, tmp_path / "m") as mnt, open(mnt / "hot.bin", "r+b") as h:
        h.write(os.urandom(256 * 1024))  # in place: the same blocks, the same size
    _set_inode(img, "hot.bin", ctime=captured, mtime=captured, version=version)
    expected = ext4_expected(img, size)
    r = vol.backup(img)
    _assert_report(r, "fs-digests")
    assert sha256(vol.restore(r.snapshot_id)) == expected
