"""The bounded walk of VMDK sparse extents (tracking/volume/vmdkgrains.py) on hand-made
extent files: grains, grain tables and the grain directory past the end are named; a header
qemu would not open, or one claiming grains too small or too many, is refused, not read at
its word. (Real images cut with
``truncate``: tests/integration/volume/test_volume_truncated.py.)"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from deltavault.errors import SourceError
from deltavault.tracking.volume.vmdkgrains import MAX_GRAINS, check_sparse_extent

GRAIN = 128  # sectors: 64 KiB


def extent(tmp: Path, *, per_gt: int = 512, grain: int = GRAIN, gd: int = 2, gt: int = 3,
           grains: list[tuple[int, int]] | None = None, size: int | None = None, flags: int = 0x30003) -> Path:
    """A compressed sparse extent of 1 MiB: the header, the grain directory at sector ``gd``
    naming one grain table at sector ``gt``, and ``grains`` as (sector, compressed size)."""
    header = struct.pack("<4sIIQQQQIQQQ", b"KDMV", 3, flags, 2048, grain, 0, 0, per_gt, 0, gd, 0)
    blob = bytearray(max(size or 0, 8 << 20))
    blob[:len(header)] = header
    blob[gd * 512:gd * 512 + 4] = struct.pack("<I", gt)
    table = [0] * per_gt
    for i, (at, n) in enumerate(grains or []):
        table[i] = at
        blob[at * 512:at * 512 + 12] = struct.pack("<QI", i * grain, n)
    blob[gt * 512:gt * 512 + 4 * per_gt] = struct.pack(f"<{per_gt}I", *table)
    end = size if size is not None else max([at * 512 + 12 + n for at, n in grains or []] + [gt * 512 + 4 * per_gt])
    p = tmp / "x.vmdk"
    p.write_bytes(bytes(blob[:end]))
    return p


def test_whole_extent_passes(tmp_path: Path) -> None:
    assert check_sparse_extent("img", str(extent(tmp_path, grains=[(8, 1000), (11, 65_600)])))


WHOLE = 11 * 512 + 12 + 65_600  # the end of the last grain of the extent below


@pytest.mark.parametrize("left, what", [(WHOLE - 1, "the grain holding the disk's bytes 65536..131072"),
                                        (WHOLE - 65_600, "the grain holding the disk's bytes 65536..131072"),
                                        (11 * 512 + 5, "the grain holding the disk's bytes 65536..131072"),
                                        (3000, "its grain table 0"), (1026, "its grain directory")])
def test_cut_extent_is_refused(tmp_path: Path, left: int, what: str) -> None:
    p = extent(tmp_path, grains=[(8, 1000), (11, 65_600)], size=left)
    with pytest.raises(SourceError, match="truncated") as e:
        check_sparse_extent("img", str(p))
    assert what in e.value.message and f"is {left} bytes long" in e.value.message


@pytest.mark.parametrize("per_gt, grain", [(1 << 30, GRAIN), (512, 0), (512, 1 << 40)])
def test_header_qemu_would_refuse_is_damaged(tmp_path: Path, per_gt: int, grain: int) -> None:
    p = tmp_path / "x.vmdk"
    p.write_bytes(struct.pack("<4sIIQQQQIQQQ", b"KDMV", 3, 0x30003, 2048, grain, 0, 0, per_gt, 0, 2, 0).ljust(8192, b"\0"))
    with pytest.raises(SourceError, match="damaged header"):
        check_sparse_extent("img", str(p))


def test_uncompressed_extent_cut_in_a_grain_is_refused(tmp_path: Path) -> None:
    p = extent(tmp_path, flags=0x3, grains=[(8, 0), (20, 0)], size=20 * 512 + GRAIN * 512 - 1)
    with pytest.raises(SourceError, match="truncated") as e:
        check_sparse_extent("img", str(p))
    assert "the grain holding the disk's bytes 65536..131072 ends at byte 75776" in e.value.message
    assert check_sparse_extent("img", str(extent(tmp_path, flags=0x3, grains=[(8, 0), (20, 0)],
                                                 size=20 * 512 + GRAIN * 512)))


def test_not_a_kdmv_extent_is_left_to_the_map(tmp_path: Path) -> None:
    p = tmp_path / "x.vmdk"
    p.write_bytes(b"COWD".ljust(8192, b"\0"))
    assert not check_sparse_extent("img", str(p))


def hostile(tmp: Path, grain: int, capacity: int, per_gt: int = 512) -> Path:
    """A compressed extent whose grain directory names one (empty) grain table everywhere."""
    tables = -(-capacity // (grain * per_gt))
    gt = 2 + -(-4 * tables // 512)
    p = tmp / "h.vmdk"
    with open(p, "wb") as f:
        f.write(struct.pack("<4sIIQQQQIQQQ", b"KDMV", 3, 0x30003, capacity, grain, 0, 0, per_gt, 0, 2, gt + 4))
        f.seek(1024)
        f.write(struct.pack("<I", gt) * tables)
        f.truncate((gt + 5) * 512)
    return p


def test_grains_below_eight_sectors_are_refused_before_the_directory_is_read(tmp_path: Path) -> None:
    """1 TiB of 512-byte grains: 4,194,304 directory entries naming one table, 2^31 grains."""
    with pytest.raises(SourceError, match="has grains of 512 bytes; a VMDK's grain is at least 4096 bytes"):
        check_sparse_extent("img", str(hostile(tmp_path, 1, 1 << 31)))


def test_more_grains_than_an_8_tib_disk_holds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=f"claims {2 * MAX_GRAINS} grains"):
        check_sparse_extent("img", str(hostile(tmp_path, 8, 8 * 2 * MAX_GRAINS)))


def test_a_table_named_by_every_directory_entry_is_read_once(tmp_path: Path) -> None:
    """The most grains allowed, all through one table: a walk of the directory, not of them."""
    assert check_sparse_extent("img", str(hostile(tmp_path, 8, 8 * MAX_GRAINS)))


def test_many_entries_naming_one_place_near_the_end_read_it_once(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlapping grain tables (each one sector after the last) whose every entry names the
    file's last sector: each entry's grain was checked in turn, a Python step (and a read of
    its marker) per entry, 1.8 s per MiB of such a file. A place is checked once now."""
    from array import array

    from deltavault.tracking.volume import vmdkgrains

    tables, per_gt, grain = 200, 512, 8
    first_gt = 1 + -(-4 * tables // 512)
    nsec = first_gt + tables + 5
    last = nsec - 1
    buf = bytearray(struct.pack("<I", last) * (nsec * 128))
    buf[:512] = struct.pack("<4sIIQQQQIQQQ", b"KDMV", 1, 0x30003, tables * per_gt * grain, grain, 0, 0,
                            per_gt, 0, 1, 0).ljust(512, b"\0")
    buf[512:512 + 4 * tables] = array("I", range(first_gt, first_gt + tables)).tobytes()
    buf[last * 512:last * 512 + 12] = struct.pack("<QI", 0, 4)  # a marker whose grain ends in the file
    p = tmp_path / "x.vmdk"
    p.write_bytes(bytes(buf))
    checks: list[int] = []
    real = vmdkgrains._check_grain

    def counted(fd: int, at: int, *args: object) -> None:
        checks.append(at)
        real(fd, at, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(vmdkgrains, "_check_grain", counted)
    assert check_sparse_extent("img", str(p))
    assert checks == [last * 512]  # once, not once for each of the 102,400 entries
