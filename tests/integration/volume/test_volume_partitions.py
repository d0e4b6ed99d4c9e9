"""Partitioned disks (GPT, MBR): metadata digests and free-space skipping per partition."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import needs_root, needs_tools
from tests.integration.volume.conftest import Vol, fill_tree, loop, mounted, run, sha256

pytestmark = [needs_root(), needs_tools("sfdisk", "losetup", "mkfs.ext4", "e2fsck"), pytest.mark.root]
MiB = 1 << 20
GAP = 90 * MiB  # an unpartitioned gap between the partitions, written raw by the test


def partitions(image: Path) -> list[tuple[int, int]]:
    table = json.loads(run("sfdisk", "-J", str(image)))["partitiontable"]
    return [(p["start"] * 512, p["size"] * 512) for p in table["partitions"]]


def make_disk(tmp: Path, label: str) -> Path:
    img = tmp / f"{label}.img"
    with open(img, "wb") as f:  # old data everywhere, as on a used disk: free space is not holes
        for _ in range(200):
            f.write(os.urandom(MiB))
    # p1 at 1 MiB (ext4, 4 KiB blocks); a gap; p2 (ext4, 1 KiB blocks) to near the end
    script = f"label: {label}\nstart=2048, size={80 * MiB // 512}, type=L\nstart={100 * MiB // 512}, type=L\n"
    if label == "gpt":
        script = script.replace("type=L", "type=0FC63DAF-8483-4772-8E79-3D69D8477DE4")
    run("sh", "-c", f"printf '{script}' | sfdisk -q {img}")
    for (off, size), block in zip(partitions(img), ("4096", "1024"), strict=True):
        with loop(img, off, size) as dev:
            run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-b", block, dev)  # keep the old data
    return img


def on_partition(img: Path, n: int, tmp: Path, fn) -> None:  # type: ignore[no-untyped-def]
    off, size = partitions(img)[n]
    with ExitStack() as stack:
        dev = stack.enter_context(loop(img, off, size))
        fn(stack.enter_context(mounted(dev, tmp / f"mnt{n}")))


def trees_equal(a: Path, b: Path, tmp: Path) -> None:
    for n in range(2):
        (oa, sa), (ob, sb) = partitions(a)[n], partitions(b)[n]
        with ExitStack() as stack:
            da = stack.enter_context(loop(a, oa, sa))
            db = stack.enter_context(loop(b, ob, sb))
            run("e2fsck", "-fn", da)
            run("e2fsck", "-fn", db)
            ma = stack.enter_context(mounted(da, tmp / f"cmp-a{n}", "-o", "ro"))
            mb = stack.enter_context(mounted(db, tmp / f"cmp-b{n}", "-o", "ro"))
            run("diff", "-r", "--no-dereference", str(ma), str(mb))


def gap_bytes(img: Path) -> bytes:
    with open(img, "rb") as f:
        f.seek(GAP)
        return f.read(MiB)


@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_partitioned_disk_uses_metadata_digests_per_partition(vol: Vol, tmp_path: Path, label: str) -> None:
    img = make_disk(tmp_path, label)
    on_partition(img, 0, tmp_path, lambda m: fill_tree(m / "data", seed=1, files=30))
    on_partition(img, 1, tmp_path, lambda m: fill_tree(m / "docs", seed=2, files=30, max_size=50_000))
    first = vol.backup(img)
    assert first.report.file_system == "partitions"
    # free space of both file systems is skipped (written with zeros here, so not holes)
    assert first.report.bytes_free_skipped > 50 * MiB
    trees_equal(vol.restore(first.snapshot_id), img, tmp_path)

    # change one file in partition 1, and write raw bytes into the gap no file system owns
    def change(m: Path) -> None:
        victim = sorted((m / "data").rglob("*"))[-1]
        victim.write_bytes(os.urandom(40_000))

    on_partition(img, 0, tmp_path, change)
    with open(img, "r+b") as f:
        f.seek(GAP)
        f.write(b"gap!" * 1024)
    second = vol.backup(img)
    rep = second.report
    assert rep.change_source == "fs-digests", rep.rejected
    # read: the 20 MiB gap (no file system vouches for it), both file systems metadata and the
    # changed file; not the 140 MiB of files and free space the digests vouch for
    assert rep.bytes_read < 50 * MiB, rep
    restored = vol.restore(second.snapshot_id)
    trees_equal(restored, img, tmp_path)
    assert gap_bytes(restored) == gap_bytes(img)
    assert partitions(restored) == partitions(img)

    # --free-space read: the restore is the image itself, byte for byte
    third = vol.backup(img, free_space="read")
    assert sha256(vol.restore(third.snapshot_id)) == sha256(img)


def test_a_changed_partition_table_falls_back(vol: Vol, tmp_path: Path) -> None:
    img = make_disk(tmp_path, "gpt")
    vol.backup(img)
    # reformat partition 2: another file system uuid, so its digests vouch for nothing
    off, size = partitions(img)[1]
    with loop(img, off, size) as dev:
        run("mkfs.ext4", "-q", "-F", dev)
    r = vol.backup(img)
    assert r.report.change_source == "block-digests"
    assert any("re-created" in x["reason"] for x in r.report.rejected), r.report.rejected
    trees_equal(vol.restore(r.snapshot_id), img, tmp_path)


@needs_tools("mkntfs", "ntfs-3g", "ntfsfix")
def test_windows_disk_with_an_ntfs_partition(vol: Vol, tmp_path: Path) -> None:
    img = make_disk(tmp_path, "dos")
    off, size = partitions(img)[1]
    with loop(img, off, size) as dev:  # partition 2 becomes NTFS, as on a Windows VM
        run("mkntfs", "-q", "-Q", "-F", "-p", str(off // 512), dev)
    with ExitStack() as stack:
        dev = stack.enter_context(loop(img, off, size))
        mnt = tmp_path / "ntfs"
        mnt.mkdir()
        run("ntfs-3g", dev, str(mnt))
        stack.callback(run, "umount", str(mnt))
        fill_tree(mnt / "Users", seed=4, files=20, max_size=80_000)
    first = vol.backup(img)
    assert first.report.file_system == "partitions"
    with ExitStack() as stack:
        dev = stack.enter_context(loop(img, off, size))
        run("ntfs-3g", dev, str(tmp_path / "ntfs"))
        stack.callback(run, "umount", str(tmp_path / "ntfs"))
        victim = sorted(p for p in (tmp_path / "ntfs" / "Users").rglob("*") if p.is_file())[0]
        victim.write_bytes(os.urandom(30_000))
    second = vol.backup(img)
    assert second.report.change_source == "fs-digests", second.report.rejected
    restored = vol.restore(second.snapshot_id)
    with ExitStack() as stack:
        a = stack.enter_context(loop(restored, off, size))
        b = stack.enter_context(loop(img, off, size))
        run("ntfsfix", "-n", a)
        for dev, name in ((a, "ra"), (b, "rb")):
            (tmp_path / name).mkdir()
            run("ntfs-3g", "-o", "ro", dev, str(tmp_path / name))
            stack.callback(run, "umount", str(tmp_path / name))
        run("diff", "-r", str(tmp_path / "ra"), str(tmp_path / "rb"))
