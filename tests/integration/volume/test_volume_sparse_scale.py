"""Large sparse volumes: a backup's work follows the data, not the size (docs/benchmarks.md,
*Scale: a 1 TiB sparse volume*). Holes known from SEEK_DATA are recorded as page ranges and
Holes, never filled with zeros and compared; and no change is missed on the way: a hole
that became data is read, data punched into a hole is restored as zeros."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from deltavault.backup.volume import blocks
from tests.integration.volume.conftest import Vol, run

GIB = 1 << 30
MIB = 1 << 20


def data_extents(path: Path) -> list[tuple[int, int]]:
    """[start, end) of the file's data as SEEK_DATA/SEEK_HOLE report it."""
    out = []
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


def digest(path: Path, start: int, end: int) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        return hashlib.sha256(f.read(end - start)).hexdigest()


def assert_same(src: Path, back: Path) -> None:
    """Equal size, and equal bytes over the union of both files' data (elsewhere both are holes)."""
    assert back.stat().st_size == src.stat().st_size
    for start, end in sorted({*data_extents(src), *data_extents(back)}):
        assert digest(back, start, end) == digest(src, start, end), (start, end)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def sparse(path: Path, size: int, islands: list[tuple[int, int]], seed: int = 1) -> Path:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
    for off, n in islands:
        write_at(path, off, rnd.randbytes(n))
    return path


def test_256_gib_sparse_full_and_incrementals(vol: Vol, tmp_path: Path) -> None:
    size = 256 * GIB + 12_345  # a tail that is not a whole page
    islands = [(0, 3 * MIB), (128 * GIB + 5 * 4096, 3 * MIB), (size - 3 * MIB, 3 * MIB)]
    img = sparse(tmp_path / "big.img", size, islands)
    r1 = vol.backup(img)
    assert 9 * MIB <= r1.report.bytes_read <= 9 * MIB + 3 * 8192  # whole pages of the islands
    assert r1.report.bytes_zero_skipped > 255 * GIB
    back = vol.restore(r1.snapshot_id, verify=False)  # its --verify reads every page
    assert_same(img, back)
    # Holes stay holes: the restore holds about the data, not 256 GiB.
    assert back.stat().st_blocks * 512 < 64 * MIB
    back.unlink()

    # A hole that became data is read; data punched into a hole is restored as zeros.
    new = random.Random(2).randbytes(2 * MIB + 4096)
    write_at(img, 200 * GIB + 4096, new)
    run("fallocate", "--punch-hole", "--offset", str(128 * GIB + 5 * 4096 + MIB), "--length", str(MIB),
        str(img))
    r2 = vol.backup(img)
    assert r2.report.pages_changed >= (len(new) + MIB) // 4096
    back = vol.restore(r2.snapshot_id, verify=False)  # its --verify reads every page
    assert_same(img, back)
    assert digest(back, 200 * GIB + 4096, 200 * GIB + 4096 + len(new)) == hashlib.sha256(new).hexdigest()
    with open(back, "rb") as f:
        f.seek(128 * GIB + 5 * 4096 + MIB)
        assert f.read(MIB) == bytes(MIB)
    back.unlink()

    # The whole island punched out (its blocks become Holes) and a new one at the very end.
    run("fallocate", "--punch-hole", "--offset", "0", "--length", str(3 * MIB), str(img))
    write_at(img, size - 100, b"x" * 100)
    r3 = vol.backup(img)
    back = vol.restore(r3.snapshot_id, verify=False)  # its --verify reads every page
    assert_same(img, back)
    with open(back, "rb") as f:
        assert f.read(3 * MIB) == bytes(3 * MIB)
        f.seek(size - 100)
        assert f.read() == b"x" * 100


def zero_work(vol: Vol, path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, int], str]:
    """Bytes the encoder filled with zeros and compared with zeros during a backup."""
    seen = {"filled": 0, "compared": 0}
    fill, whole = blocks.SegmentEncoder._zero, blocks.SegmentEncoder._whole

    def counted_fill(self: blocks.SegmentEncoder, mv: memoryview, start: int, end: int) -> None:
        seen["filled"] += max(0, end - start)
        fill(self, mv, start, end)

    def counted_whole(self: blocks.SegmentEncoder, mv: memoryview, off: int, blen: int) -> object:
        seen["compared"] += blen
        return whole(self, mv, off, blen)

    monkeypatch.setattr(blocks.SegmentEncoder, "_zero", counted_fill)
    monkeypatch.setattr(blocks.SegmentEncoder, "_whole", counted_whole)
    try:
        sid = vol.backup(path, source_id=path.name).snapshot_id
    finally:
        monkeypatch.undo()
    return seen, sid


def test_zero_work_does_not_grow_with_the_hole(vol: Vol, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same data (one block part data, part hole; one block of data) before a 1 GiB and a
    # 64 GiB hole: the zeros filled and compared are those of the data's blocks only.
    islands = [(MIB + 8192, 300_000), (4 * MIB, MIB)]
    (small, sid_small) = zero_work(vol, sparse(tmp_path / "small.img", GIB, islands), monkeypatch)
    (large, sid_large) = zero_work(vol, sparse(tmp_path / "large.img", 64 * GIB, islands), monkeypatch)
    assert small == large
    assert 0 < small["filled"] < 2 * MIB and small["compared"] == 2 * MIB
    for name, sid in (("small.img", sid_small), ("large.img", sid_large)):
        back = vol.restore(sid, verify=False)  # its --verify reads every page
        assert_same(tmp_path / name, back)
        back.unlink()
