"""NTFS volumes: built with mkntfs and ntfscp (no mount), changed through ntfs-3g mounts."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import needs_root, needs_tools
from tests.integration.volume.conftest import Vol, fsck_clean, loop, mounted, run, sha256

pytestmark = [needs_root(), needs_tools("mkntfs", "ntfscp", "ntfs-3g", "ntfsfix", "losetup"), pytest.mark.root]
SIZE_MB = 64


def make_ntfs(tmp: Path, seed: int) -> Path:
    img = tmp / "n.img"
    with open(img, "wb") as f:
        f.truncate(SIZE_MB << 20)
    run("mkntfs", "-F", "-Q", "-q", str(img))
    import random

    rnd = random.Random(seed)
    for i in range(12):
        src = tmp / f"in{i}.bin"
        src.write_bytes(rnd.randbytes(rnd.randrange(1, 400_000)))
        run("ntfscp", "-q", str(img), str(src), f"f{i}.bin")
    return img


def _changes(mnt: Path) -> None:
    with open(mnt / "f0.bin", "r+b") as h:
        h.seek(8192)
        h.write(os.urandom(8192))
    with open(mnt / "f1.bin", "ab") as h:
        h.write(os.urandom(50_000))
    (mnt / "dir").mkdir()
    (mnt / "dir" / "new.bin").write_bytes(os.urandom(300_000))
    (mnt / "f2.bin").unlink()
    # A named stream (alternate data stream), through ntfs-3g's xattr interface.
    subprocess.run(["setfattr", "-n", "user.stream", "-v", "0x" + os.urandom(20_000).hex(),
                    str(mnt / "f3.bin")], check=True)


def _tree(mnt: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(mnt.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(mnt))] = p.read_bytes()
            attrs = run("getfattr", "-d", "-e", "hex", str(p), check=False)
            out[str(p.relative_to(mnt)) + ":xattrs"] = attrs.split("\n", 1)[-1].encode()
    return out


def test_ntfs_digests_incremental(vol: Vol, tmp_path: Path) -> None:
    img = make_ntfs(tmp_path, seed=1)
    first = vol.backup(img)
    assert first.report.file_system == "ntfs"
    assert sha256(vol.restore(first.snapshot_id)) == sha256(img)

    with loop(img) as dev:
        with mounted(dev, tmp_path / "m", "-t", "ntfs-3g") as mnt:
            _changes(mnt)
            vol.backup(img, cbt="digests")  # mounted (frozen by nothing): no checkpoint kept
        with mounted(dev, tmp_path / "m", "-t", "ntfs-3g", "-o", "ro") as mnt:
            want = _tree(mnt)
    # --cbt digests kept no metadata digests; run once more to have a checkpoint.
    vol.backup(img)
    with loop(img) as dev, mounted(dev, tmp_path / "m", "-t", "ntfs-3g") as mnt:
        with open(mnt / "f4.bin", "r+b") as h:
            h.write(os.urandom(4096))
        with open(mnt / "f4.bin", "rb") as h:
            want["f4.bin"] = h.read()
    r = vol.backup(img)
    assert r.report.change_source == "fs-digests", (r.report.rejected, r.report.notes)
    assert r.report.bytes_read < (SIZE_MB << 20) / 4
    restored = vol.restore(r.snapshot_id)
    fsck_clean(restored, "ntfs")
    with loop(restored) as dev, mounted(dev, tmp_path / "r", "-t", "ntfs-3g", "-o", "ro") as mnt:
        assert _tree(mnt) == want


def test_ntfs_free_space_read_is_exact(vol: Vol, tmp_path: Path) -> None:
    img = make_ntfs(tmp_path, seed=2)
    vol.backup(img, free_space="read")
    with loop(img) as dev, mounted(dev, tmp_path / "m", "-t", "ntfs-3g") as mnt:
        _changes(mnt)
    r = vol.backup(img, free_space="read")
    assert r.report.change_source == "fs-digests", (r.report.rejected, r.report.notes)
    assert sha256(vol.restore(r.snapshot_id)) == sha256(img)


def test_ntfs_dirty_volume_is_not_trusted(vol: Vol, tmp_path: Path) -> None:
    img = make_ntfs(tmp_path, seed=3)
    vol.backup(img)
    # ntfsfix -d clears the dirty flag; setting it is what Windows does on an unclean stop.
    from dissect.ntfs import NTFS

    with open(img, "rb") as f:
        fs = NTFS(f)
        vol_rec = fs.mft.get(3)  # $Volume; the first records of $MFT are contiguous
        info = vol_rec.attributes[0x70][0]
        off = (fs.boot_sector.MftStartLcn * fs.cluster_size + vol_rec.offset + info.header.offset
               + info.header.header.Form.Resident.ValueOffset + 10)
    with open(img, "r+b") as f:
        f.seek(off)
        flags = int.from_bytes(f.read(2), "little")
        f.seek(off)
        f.write((flags | 1).to_bytes(2, "little"))
    r = vol.backup(img)
    assert r.report.change_source == "block-digests"
    assert any("dirty" in x["reason"] for x in r.report.rejected)
    assert r.report.bytes_free_skipped == 0
    assert sha256(vol.restore(r.snapshot_id)) == sha256(img)



def _si_times_at(img: Path, name: str) -> int:
    """Where the four times of the file ``name``'s $STANDARD_INFORMATION lie in the image
    (its MFT record found through $MFT's own runs; the times lie in the record's first
    sector, away from the update sequence's fixups)."""
    from dissect.ntfs import NTFS

    with open(img, "rb") as f:
        fs = NTFS(f)
        rec = fs.mft.get(name)
        si = rec.attributes[0x10][0]
        at = rec.offset + si.header.offset + si.header.header.Form.Resident.ValueOffset
        mft = fs.mft.get(0).attributes[0x80][0]
        vcn = 0
        for lcn, count in mft.header.dataruns():
            if at < (vcn + count) * fs.cluster_size:
                return lcn * fs.cluster_size + at - vcn * fs.cluster_size
            vcn += count
    raise AssertionError(f"{name}: MFT record not found")


def test_a_file_rewritten_within_the_tick_of_the_capture_is_read_again(vol: Vol, tmp_path: Path) -> None:
    """Windows stamps NTFS times at its clock tick (15.6 ms): a file written just before
    the capture and overwritten in place in the same tick after it keeps its MFT record,
    times included, with other data, and its digest vouched for the old clusters in every
    later run. Now a file changed within a second of the newest MFT-change time gets a
    digest that matches nothing. ntfs-3g stamps every write anew, so the same tick is made
    without timing: after the overwrite, the record's times are written back as they were."""
    img = make_ntfs(tmp_path, seed=4)
    with loop(img) as dev, mounted(dev, tmp_path / "m", "-t", "ntfs-3g") as mnt:
        (mnt / "hot.bin").write_bytes(os.urandom(256 * 1024))
    at = _si_times_at(img, "hot.bin")
    # Written in the tick of the capture: its times are now's, later than any the unmount
    # stamped (a loaded machine took over a second between the write and the unmount's
    # last stamp, and the file was then rightly not racy).
    now = (int(time.time()) + 11_644_473_600) * 10_000_000  # 100 ns since 1601
    times = now.to_bytes(8, "little") * 4  # created, written, MFT-changed, read
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(times)
    vol.backup(img)
    with loop(img) as dev, mounted(dev, tmp_path / "m", "-t", "ntfs-3g") as mnt, open(mnt / "hot.bin", "r+b") as h:
        h.write(os.urandom(256 * 1024))  # in place: the same clusters, the same size
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(times)
    r = vol.backup(img)
    assert r.report.change_source == "fs-digests", (r.report.rejected, r.report.notes)
    assert sha256(vol.restore(r.snapshot_id)) == sha256(img)
