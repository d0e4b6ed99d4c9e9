"""Volume test helpers: loop devices and mounts that are always released, real file systems,
and the volume engine driven through its API against a fresh repository."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from deltavault.backup.volume.options import VolumeOptions, VolumeRequest, VolumeResult
from deltavault.backup.volume.run import run_volume_backup
from deltavault.objects.volumes import load_manifest
from deltavault.repository.repository import Repository
from deltavault.restore.volume import VolumeRestoreOptions, VolumeRestorer
from tests.loopdev import loop, mounted, run, umount  # noqa: F401 - re-exported to the volume tests

PAGE = 4096


def sha256(path: str | Path, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left is None or left > 0:
            block = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


def ext4_free_blocks(device: str | Path) -> tuple[int, list[tuple[int, int]]]:
    """(block size, [first, last] free block ranges) as dumpe2fs sees them."""
    out = run("dumpe2fs", str(device))
    bs = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    ranges = []
    # Per-group lines are indented; the header's "Free blocks:" is a count, not a range.
    for m in re.finditer(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in m.group(1).split(","):
            part = part.strip()
            if part:
                a, _, b = part.partition("-")
                ranges.append((int(a), int(b or a)))
    return bs, ranges


def sha256_free_zeroed(path: str | Path, size: int, unit: int, free: list[tuple[int, int]]) -> str:
    """sha256 of the volume with its wholly free 4 KiB pages read as zeros: what a restore
    with --free-space skip must produce (a page partly in use is captured whole)."""
    data = bytearray(size)
    with open(path, "rb") as f:
        f.readinto(data)
    for a, b in free:
        start = -(-a * unit // PAGE) * PAGE
        end = (b + 1) * unit // PAGE * PAGE
        if end > start:
            data[start:end] = bytes(end - start)
    return hashlib.sha256(data).hexdigest()


def ext4_expected(image: str | Path, size: int, device: str | Path | None = None) -> str:
    """Free blocks from dumpe2fs (of the mounted device, if given: the metadata it reads is
    current), data from the image file: a buffered read of a mounted device can be stale."""
    bs, free = ext4_free_blocks(device or image)
    return sha256_free_zeroed(image, size, bs, free)


@dataclass
class Vol:
    repo: Repository
    tmp: Path

    def backup(self, path: str | Path, **opts: object) -> VolumeResult:
        source_id = str(opts.pop("source_id", "test-volume"))
        parent = opts.pop("parent", None)
        o = VolumeOptions(**opts)  # type: ignore[arg-type]
        return run_volume_backup(self.repo, VolumeRequest(str(path), source_id=source_id,
                                                          parent=parent, options=o))  # type: ignore[arg-type]

    def restore(self, sid: str, target: Path | None = None, *, verify: bool = True) -> Path:
        target = target or self.tmp / f"restore-{sid[:8]}.img"
        _sid, snap = self.repo.resolve_snapshot(sid)
        assert snap.volume is not None
        manifest = load_manifest(self.repo, snap.volume)
        key = self.repo.master.mac if self.repo.master else None
        st = VolumeRestorer(self.repo, manifest, str(target),
                            VolumeRestoreOptions(overwrite=True, verify=verify, page_key=key)).run()
        assert st.pages_mismatched == 0, st.mismatches
        return target

    def lose_local_state(self) -> None:
        assert self.repo.cache_dir is not None
        run("rm", "-rf", str(self.repo.cache_dir / "volumes"))


@pytest.fixture
def vol(make_repo: Callable[..., Repository], tmp_path: Path) -> Vol:
    return Vol(make_repo(), tmp_path)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def fsck_clean(image: str | Path, fstype: str = "ext4") -> None:
    if fstype == "ext4":
        p = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    else:
        p = subprocess.run(["ntfsfix", "-n", str(image)], capture_output=True, text=True)
    assert p.returncode == 0, f"fsck of {image} not clean:\n{p.stdout}\n{p.stderr}"


def make_ext4(path: Path, size_mb: int, content: Path | None = None, *extra: str) -> Path:
    """An ext4 image holding the tree ``content``, whose entries were changed a day before
    the image was captured (as on a volume in use): made now, they would all be changed in
    the second of the capture, which the next run reads again (tracking/volume/racy.py)."""
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    args = ["mke2fs", "-q", "-F", "-t", "ext4", *extra]
    if content is not None:
        args += ["-d", str(content)]
    run(*args, str(path))
    if content is not None:
        backdate_ext4(path, content)
    return path


DAY_AGO = int(time.time()) - 86400


def backdate_ext4(fs: str | Path, content: Path) -> None:
    """Set the times of the root, lost+found and the tree ``content`` copied into the ext4
    ``fs`` (an image or a device) a day back (debugfs)."""
    names = ["/", "/lost+found", *("/" + str(p.relative_to(content)) for p in sorted(content.rglob("*")))]
    script = "".join(f"sif {n} {f} @{DAY_AGO}\n" for n in names for f in ("ctime", "mtime"))
    subprocess.run(["debugfs", "-w", "-f", "-", str(fs)], input=script, text=True, check=True, capture_output=True)


def backdate_ntfs(fs: str | Path) -> None:
    """Set the four $STANDARD_INFORMATION times of every file and directory of the NTFS
    ``fs`` (an image or a device; system files left alone) a day back, in their MFT
    records (ntfs-3g would stamp the MFT-change time with now)."""
    from dissect.ntfs import NTFS
    from dissect.ntfs.mft import MftRecord

    filetime = ((DAY_AGO + 11644473600) * 10**7).to_bytes(8, "little") * 4
    with open(fs, "r+b") as f:
        ntfs = NTFS(f)
        rs, cs = ntfs._record_size, ntfs.cluster_size
        mft = ntfs.mft.get(0)
        runs, size = list(mft.attributes[0x80][0].header.dataruns()), mft.size()
        fh = ntfs.mft.fh
        fh.seek(0)
        data = fh.read(size)
        for n in range(24, len(data) // rs):  # 0-23: system files and reserved records
            raw = data[n * rs:(n + 1) * rs]
            if raw[:4] != b"FILE":
                continue
            rec = MftRecord.from_bytes(raw, ntfs)
            if not rec.header.Flags & 1 or not rec.attributes[0x10]:
                continue
            si = rec.attributes[0x10][0]
            at = n * rs + si.header.offset + si.header.header.Form.Resident.ValueOffset
            vcn = 0
            for lcn, count in runs:
                if at < (vcn + count) * cs:
                    f.seek(lcn * cs + at - vcn * cs)
                    f.write(filetime)
                    break
                vcn += count
        os.fsync(f.fileno())


def fill_tree(root: Path, seed: int, files: int = 20, max_size: int = 300_000) -> Path:
    import random

    rnd = random.Random(seed)
    for i in range(files):
        p = root / f"d{i % 4}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        n = rnd.randrange(1, max_size)
        p.write_bytes(rnd.randbytes(n // 2) + bytes(n - n // 2))
    return root


os.environ.setdefault("DISSECT_LOG_EXTFS", "CRITICAL")
