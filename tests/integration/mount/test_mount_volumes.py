"""Volume snapshots in the mount: each image (and each partition) byte-equal to the source
and loop-mountable read-only, for ext4, XFS, btrfs and NTFS."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cli, needs_root, needs_tools
from tests.integration.mount.conftest import mounted
from tests.loopdev import loop, run
from tests.loopdev import mounted as fs_mounted

pytestmark = [needs_root(), needs_tools("fusermount3", "losetup", "mkfs.xfs", "mkfs.btrfs", "mkntfs",
                                        "ntfs-3g", "sfdisk"), pytest.mark.root]
MiB = 1 << 20
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"], "btrfs": ["mkfs.btrfs", "-q", "-f"],
        "ntfs": ["mkntfs", "-F", "-Q", "-q"]}
SIZE = {"ext4": 64, "xfs": 320, "btrfs": 160, "ntfs": 64}
FSTYPE = {"ext4": ["-t", "ext4"], "xfs": ["-t", "xfs"], "btrfs": ["-t", "btrfs"], "ntfs": ["-t", "ntfs-3g"]}


def digest(path: Path, offset: int = 0, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size if size is not None else os.fstat(f.fileno()).st_size - offset
        while left > 0:
            b = f.read(min(4 * MiB, left))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def make_image(tmp: Path, fs: str, seed: int) -> tuple[Path, dict[str, bytes]]:
    img = tmp / f"{fs}.img"
    with open(img, "wb") as f:
        f.truncate(SIZE[fs] * MiB)
    run(*MKFS[fs], str(img))
    rnd = random.Random(seed)
    files = {f"dir/f{i}.bin": rnd.randbytes(rnd.randrange(1, 900_000)) for i in range(6)}
    with loop(img) as dev, fs_mounted(dev, tmp / f"w-{fs}", *FSTYPE[fs]) as mnt:
        for name, data in files.items():
            (mnt / name).parent.mkdir(exist_ok=True)
            (mnt / name).write_bytes(data)
    return img, files


def check_files(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data, name


@pytest.mark.parametrize("fs", ["ext4", "xfs", "btrfs", "ntfs"])
def test_a_volume_image_in_the_mount_is_the_source_and_loop_mounts(cli: Cli, tmp_path: Path, fs: str) -> None:
    img, files = make_image(tmp_path, fs, seed=len(fs))
    assert cli("init").returncode == 0
    r = cli("backup", "--volume", str(img), "--free-space", "read")
    assert r.returncode == 0, r.stderr
    with mounted(cli, tmp_path / "mnt") as mnt:
        vols = [n for n in os.listdir(mnt / "volumes") if n != "latest"]
        assert len(vols) == 1
        image = mnt / "volumes" / vols[0] / "disk.img"
        assert os.listdir(image.parent) == ["disk.img"]
        assert os.path.getsize(image) == os.path.getsize(img)
        assert digest(image) == digest(img)
        with loop(image) as dev, fs_mounted(dev, tmp_path / "inner", *FSTYPE[fs], "-o", "ro") as inner:
            check_files(inner, files)
        # and the kernel's own way: mount -o loop,ro
        (tmp_path / "inner2").mkdir()
        run("mount", *FSTYPE[fs], "-o", "loop,ro", str(image), str(tmp_path / "inner2"))
        try:
            check_files(tmp_path / "inner2", files)
        finally:
            run("umount", str(tmp_path / "inner2"))


def test_a_partitioned_disk_shows_one_file_per_partition(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(200 * MiB)
    p = subprocess.run(["sfdisk", "-q", str(disk)], input="label: gpt\nstart=2048, size=131072\n"
                                     "start=135168, size=200000\n", text=True, capture_output=True)
    assert p.returncode == 0, p.stderr
    ext4, files4 = make_image(tmp_path, "ext4", seed=1)
    ntfs, filesn = make_image(tmp_path, "ntfs", seed=2)
    with open(disk, "r+b") as d:
        for src, off in ((ext4, 2048 * 512), (ntfs, 135168 * 512)):
            d.seek(off)
            d.write(src.read_bytes()[: (131072 if src == ext4 else 200000) * 512])
    assert cli("init").returncode == 0
    r = cli("backup", "--volume", str(disk))
    assert r.returncode == 0, r.stderr
    with mounted(cli, tmp_path / "mnt") as mnt:
        vol = next(mnt / "volumes" / n for n in os.listdir(mnt / "volumes") if n != "latest")
        assert sorted(os.listdir(vol)) == ["disk.img", "part1.img", "part2.img"]
        assert os.path.getsize(vol / "part1.img") == 131072 * 512
        assert digest(vol / "part1.img") == digest(disk, 2048 * 512, 131072 * 512)
        assert digest(vol / "part2.img") == digest(disk, 135168 * 512, 200000 * 512)
        with loop(vol / "part1.img") as dev, fs_mounted(dev, tmp_path / "p1", "-o", "ro") as inner:
            check_files(inner, files4)
        with loop(vol / "part2.img") as dev, fs_mounted(dev, tmp_path / "p2", "-t", "ntfs-3g", "-o", "ro") as inner:
            check_files(inner, filesn)
        # holes of the image answer SEEK_HOLE: the gap after partition 2 was never written
        fd = os.open(vol / "disk.img", os.O_RDONLY)
        try:
            end = os.lseek(fd, (135168 + 200000) * 512 + MiB, os.SEEK_HOLE)
            assert end < 200 * MiB
        finally:
            os.close(fd)
