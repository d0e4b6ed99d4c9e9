"""A volume whose content a VM's tenant controls: file-system metadata crafted to make an
incremental skip changed blocks, or to make the backup host loop or read without end."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import needs_root, needs_tools
from tests.integration.volume.conftest import (
    DAY_AGO,
    Vol,
    backdate_ext4,
    backdate_ntfs,
    ext4_expected,
    fill_tree,
    loop,
    mounted,
    run,
    sha256,
)

pytestmark = [needs_root(), needs_tools("mke2fs", "debugfs", "dumpe2fs", "losetup", "mkntfs", "ntfscp", "ntfs-3g"),
              pytest.mark.root]
SIZE_MB = 32
FS_BLOCKS = 6144  # 24 MiB of 4 KiB blocks: the last 8 MiB of the volume lie past the file system


def _debugfs(img: Path, cmd: str) -> str:
    return subprocess.run(["debugfs", "-w", "-R", cmd, str(img)], capture_output=True, text=True,
                          check=True).stdout


def _first_block(img: Path, name: str) -> int:
    return int(_debugfs(img, f"bmap /{name} 0").split()[-1])


def _itable_block(img: Path, name: str) -> int:
    """The inode-table block holding ``name``'s inode."""
    out = _debugfs(img, f"imap /{name}")
    return int(re.search(r"located at block (\d+)", out).group(1))  # type: ignore[union-attr]


def _write_there_and_check(vol: Vol, img: Path, tmp: Path, target: str, where: int,
                           mount: tuple[str, ...], expected: Callable[[], str], **opts: object) -> None:
    """Back up, write where the decoy points (victim.bin through the kernel, or the tail
    past the file system straight), back up again: the restore must equal ``expected()``
    and fs-digests must have refused, saying why."""
    past = target == "past the file system"
    if past:  # data there, not a hole (a hole is read once filled)
        _scribble(img, where)
    first = vol.backup(img, **opts)
    if past:
        _scribble(img, where)
    else:
        with loop(img) as dev, mounted(dev, tmp / "m", *mount) as mnt, open(mnt / "victim.bin", "r+b") as h:
            h.write(os.urandom(64 * 1024))  # in place, through the kernel: a normal write
    want = expected()
    r = vol.backup(img, **opts)
    assert sha256(vol.restore(r.snapshot_id)) == want
    assert r.report.change_source == "block-digests"
    # a mapping outside the file system is refused when the digests are made: none kept
    reasons = " ".join([*(x["reason"] for x in r.report.rejected if x["source"] == "fs-digests"),
                        *first.report.notes])
    assert "claimed both by an unchanged file" in reasons or "outside the file system" in reasons, reasons


def _scribble(img: Path, block: int) -> None:
    with open(img, "r+b") as f:
        f.seek(block * 4096)
        f.write(os.urandom(16 * 4096))


@pytest.mark.parametrize("target", ["another file", "the inode table", "past the file system"])
def test_an_unchanged_file_pointed_at_blocks_others_write_vouches_for_none(
        vol: Vol, tmp_path: Path, target: str) -> None:
    """The guest points an unchanged file's extent at blocks something else writes: another
    file's data, the inode table, or the volume's tail past the file system. Its digest
    never changes, and it vouched for those blocks: every later write there was missed for
    good (the restore held the old bytes). Now a page claimed by an unchanged file and by
    anything else makes fs-digests refuse, with the reason, and block digests read it."""
    src = fill_tree(tmp_path / "src", seed=3, files=4, max_size=200_000)
    (src / "decoy.bin").write_bytes(os.urandom(64 * 1024))
    (src / "victim.bin").write_bytes(os.urandom(64 * 1024))
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(SIZE_MB << 20)
    run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", str(src), str(img), str(FS_BLOCKS))
    backdate_ext4(img, src)
    where = {"another file": lambda: _first_block(img, "victim.bin"),
             "the inode table": lambda: _itable_block(img, "victim.bin"),
             "past the file system": lambda: FS_BLOCKS + 100}[target]()
    # decoy.bin's one extent (i_block[3..5] after the header): its physical start
    _debugfs(img, f"sif /decoy.bin block[5] {where}")
    _debugfs(img, f"sif /decoy.bin ctime @{DAY_AGO}")  # debugfs stamped it now
    _write_there_and_check(vol, img, tmp_path, target, where, (), lambda: ext4_expected(img, SIZE_MB << 20))


def _ntfs_point_runs(img: Path, name: str, lcn: int) -> None:
    """Point the first data run of the NTFS file ``name`` at cluster ``lcn``, in its MFT
    record on disk (the run's LCN field keeps its width)."""
    from dissect.ntfs import NTFS

    with open(img, "r+b") as f:
        ntfs = NTFS(f)
        rec = ntfs.mft.get(name)
        hdr = rec.attributes[0x80][0].header
        at = rec.offset + hdr.offset + hdr.header.Form.Nonresident.MappingPairsOffset
        mft_runs = list(ntfs.mft.get(0).attributes[0x80][0].header.dataruns())
        cs = ntfs.cluster_size
        vcn = 0
        for run_lcn, count in mft_runs:  # the record's offset in the MFT, to the volume's
            if at < (vcn + count) * cs:
                at = run_lcn * cs + at - vcn * cs
                break
            vcn += count
        f.seek(at)
        head = f.read(1)[0]
        width, skip = head >> 4, head & 0xF
        assert lcn < 1 << (8 * width - 1), (lcn, width)
        f.seek(at + 1 + skip)
        f.write(lcn.to_bytes(width, "little"))


@pytest.mark.parametrize("target", ["another file", "the MFT", "past the file system"])
def test_an_unchanged_ntfs_file_pointed_at_clusters_others_write_vouches_for_none(
        vol: Vol, tmp_path: Path, target: str) -> None:
    """NTFS's counterpart: the guest points an unchanged file's data run at another file's
    clusters, at the MFT, or past the file system. Its record's digest never changes, and
    every later write there was missed. Now such pages make fs-digests refuse."""
    from dissect.ntfs import NTFS

    img = tmp_path / "n.img"
    with open(img, "wb") as f:
        f.truncate(SIZE_MB << 20)
    run("mkntfs", "-F", "-Q", "-q", "-c", "4096", str(img), str(FS_BLOCKS * 8))  # 512-byte sectors
    for name in ("decoy.bin", "victim.bin"):
        (tmp_path / name).write_bytes(os.urandom(64 * 1024))
        run("ntfscp", "-q", str(img), str(tmp_path / name), name)
    backdate_ntfs(img)
    with open(img, "rb") as f:
        ntfs = NTFS(f)
        where = {"another file": lambda: ntfs.mft.get("victim.bin").attributes[0x80][0].header.dataruns()[0][0],
                 # the cluster holding victim.bin's own MFT record (the MFT is contiguous here)
                 "the MFT": lambda: (ntfs.mft.get(0).attributes[0x80][0].header.dataruns()[0][0]
                                     + ntfs.mft.get("victim.bin").offset // ntfs.cluster_size),
                 "past the file system": lambda: FS_BLOCKS + 100}[target]()
    _ntfs_point_runs(img, "decoy.bin", where)
    _write_there_and_check(vol, img, tmp_path, target, where, ("-t", "ntfs-3g"), lambda: sha256(img),
                           free_space="read")


@pytest.mark.parametrize("mkfs", [("-b", "1024"), ("-b", "4096")])
def test_an_honest_file_system_is_not_refused(vol: Vol, tmp_path: Path, mkfs: tuple[str, ...]) -> None:
    """The check above must not refuse a file system whose owners are honest: a file of
    several extents (5 MiB across block groups), 1 KiB blocks (four to a page),
    directories, the journal, a file changed and one appended to between runs. (Block-mapped
    files are not tried: ext2/3 and 32-bit ext4, the only file systems that have them, are
    not trusted at all, see docs/security.md.)"""
    src = fill_tree(tmp_path / "src", seed=5, files=12)
    (src / "big.bin").write_bytes(os.urandom(5 << 20))
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(SIZE_MB << 20)
    run("mke2fs", "-q", "-F", "-t", "ext4", *mkfs, "-d", str(src), str(img))
    backdate_ext4(img, src)
    vol.backup(img)
    with loop(img) as dev, mounted(dev, tmp_path / "m") as mnt:
        with open(mnt / "big.bin", "r+b") as h:
            h.seek(3 << 20)
            h.write(os.urandom(100_000))
        with open(mnt / "d1" / "f1.bin", "ab") as h:
            h.write(os.urandom(70_000))
    expected = ext4_expected(img, SIZE_MB << 20)
    r = vol.backup(img)
    assert r.report.change_source == "fs-digests", r.report.rejected
    assert sha256(vol.restore(r.snapshot_id)) == expected
