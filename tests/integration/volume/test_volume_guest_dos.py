"""A volume whose content a VM's tenant controls, backed up through the real CLI under the
suite's memory limit (tests/memlimit.py): metadata crafted to make the backup host loop or
take unbounded memory must end in a backup that reads the blocks, with the reason."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, needs_root, needs_tools
from tests.integration.volume.conftest import ext4_expected, run, sha256

pytestmark = [needs_root(), pytest.mark.root, needs_tools("mke2fs", "debugfs", "mkntfs", "ntfscp", "sfdisk"),
              pytest.mark.memory_limit]
BS = 4096


def _backups(cli: Cli, img: Path, runs: int, *opts: str) -> dict[str, Any]:
    """A new repository, ``runs`` backups of ``img`` through the CLI: the last summary."""
    assert cli("init").returncode == 0
    for _ in range(runs):
        r = cli("--json", "backup", "--volume", str(img), *opts)
        assert r.returncode == 0, r.stderr
    return r.last("summary")  # type: ignore[no-any-return]


def _restored(cli: Cli, summary: dict[str, Any], tmp: Path) -> str:
    """sha256 of the snapshot restored to an image file."""
    out = tmp / "out.img"
    assert cli("restore", "--volume", summary["snapshot"], str(out)).returncode == 0
    return sha256(out)


def _node(depth: int, entries: list[tuple[int, int]]) -> bytes:
    """An extent tree block: (logical, child or physical block) entries, 1 block each."""
    out = struct.pack("<HHHHI", 0xF30A, len(entries), 340, depth, 0)
    for lblk, blk in entries:
        out += struct.pack("<IHHI", lblk, 1, 0, blk) if depth == 0 else struct.pack("<IIHH", lblk, blk, 0, 0)
    return out.ljust(BS, b"\0")


def _ext4_with_fanned_out_tree(tmp: Path) -> Path:
    """x.bin's extent tree: 4 levels below the inode, each index node naming the next one
    340 times, a leaf of 340 one-block extents: 4 x 340^4 leaves from 4 blocks."""
    src = tmp / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(b"x" * BS)
    img = tmp / "v.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    run("mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BS), "-d", str(src), str(img))
    out = run("debugfs", "-R", "ffb 4 2000", str(img))
    nodes = [int(b) for b in out.split(":")[-1].split()]
    data = int(run("debugfs", "-R", "bmap /x.bin 0", str(img)).split()[-1])
    with open(img, "r+b") as f:
        for level, blk in enumerate(nodes):  # nodes[0] at depth 3 ... nodes[3] the leaf
            depth = 3 - level
            child = nodes[level + 1] if depth else data
            f.seek(blk * BS)
            f.write(_node(depth, [(i, child) for i in range(340)]))
    words = struct.unpack("<15I", struct.pack("<HHHHI", 0xF30A, 4, 4, 4, 0)
                          + b"".join(struct.pack("<IIHH", i, nodes[0], 0, 0) for i in range(4)))
    script = "".join(f"sif /x.bin block[{i}] {w}\n" for i, w in enumerate(words))
    subprocess.run(["debugfs", "-w", "-f", "-", str(img)], input=script, text=True, check=True,
                   capture_output=True)
    return img


def test_an_extent_tree_fanned_out_into_billions_of_leaves_is_refused(cli: Cli, tmp_path: Path) -> None:
    """dissect.extfs followed every index entry, and fs-digests listed every leaf: 5 x 10^10
    from four blocks, so the backup grew without bound and was killed. Now each tree block is
    read once in the whole scan: the second visit refuses the file system's digests."""
    img = _ext4_with_fanned_out_tree(tmp_path)
    s = _backups(cli, img, 2)
    assert s["change_source"] == "block-digests", s
    why = " ".join(x["reason"] for x in s["rejected"])
    assert "reached twice" in why or "no checkpoint" in why, why
    assert _restored(cli, s, tmp_path) == ext4_expected(img, img.stat().st_size)


def test_a_superblock_claiming_two_billion_inodes_per_group_is_not_read_whole(cli: Cli, tmp_path: Path) -> None:
    """s_inodes_per_group is the guest's: 2^31 made each group's inode table "as big as
    the volume", and it was read into memory whole (2.1 GB of RSS for a 1 GiB volume, killed
    under the limit). The kernel refuses more inodes per group than a bitmap block has bits;
    so does the scanner now, and the volume is read block by block, with the reason."""
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(512 << 20)
    run("mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BS), str(img))
    with open(img, "r+b") as f:
        f.seek(1024 + 0x28)  # s_inodes_per_group
        f.write(struct.pack("<I", 1 << 31))
    s = _backups(cli, img, 1)
    assert any("impossible geometry" in n for n in s["notes"]), s
    assert _restored(cli, s, tmp_path) == sha256(img)


def _ntfs_with_a_sparse_mft(tmp: Path, clusters: int) -> Path:
    """$MFT's data: its real run, then ``clusters`` sparse ones (read as zeros), the sizes
    to match (the mapping pairs rewritten in place: they fit the attribute's 8 bytes)."""
    from dissect.ntfs import NTFS

    img = tmp / "n.img"
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    run("mkntfs", "-F", "-Q", "-q", "-c", str(BS), str(img))
    (tmp / "f.bin").write_bytes(b"f" * 100_000)
    run("ntfscp", "-q", str(img), str(tmp / "f.bin"), "f.bin")
    with open(img, "r+b") as f:
        ntfs = NTFS(f)
        hdr = ntfs.mft.get(0).attributes[0x80][0].header
        (first, count), = hdr.dataruns()
        at = first * BS + hdr.offset
        f.seek(at)
        raw = bytearray(f.read(hdr.record_length))
        mpo = struct.unpack_from("<H", raw, 0x20)[0]
        pairs = bytes([0x11, count, first, 0x03]) + clusters.to_bytes(3, "little") + b"\0"
        assert count < 128 and first < 128 and mpo + len(pairs) <= len(raw)
        raw[mpo:mpo + len(pairs)] = pairs
        struct.pack_into("<Q", raw, 0x18, count + clusters - 1)  # HighestVcn
        for off in (0x28, 0x30, 0x38):  # allocated, data and initialized sizes
            struct.pack_into("<Q", raw, off, (count + clusters) * BS)
        f.seek(at)
        f.write(raw)
    return img


def test_an_mft_claiming_a_gibibyte_is_read_a_chunk_at_a_time(cli: Cli, tmp_path: Path) -> None:
    """The MFT was read into memory whole, at the size its record gives: 1 GiB here, made
    of a sparse run (so are a million files' records on a real volume). Killed under the
    limit; now its records are read 4,096 at a time, and no further than the volume."""
    img = _ntfs_with_a_sparse_mft(tmp_path, 0x40000)
    s = _backups(cli, img, 2, "--free-space", "read")
    assert s["change_source"] == "fs-digests", s
    assert _restored(cli, s, tmp_path) == sha256(img)


def test_a_gpt_of_two_billion_entries_of_size_zero_is_not_used(cli: Cli, tmp_path: Path) -> None:
    """dissect.volume reads as many GPT entries as the header claims, each at entry size
    apart: 2^31 entries of size 0 are the first entry 2^31 times, listed as partitions
    (2.4 GB in a minute, killed under the limit; 2^31 of size 128 read the whole disk, 100 s
    per GiB). The table's reads are bounded now: past them it is not used, and said so."""
    img = tmp_path / "g.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(img)], input="label: gpt\n,8M,L\n", text=True, check=True)
    with open(img, "r+b") as f:
        f.seek(512 + 80)  # the GPT header's NumberOfPartitionEntries, SizeOfPartitionEntry
        f.write(struct.pack("<II", 1 << 31, 0))
    s = _backups(cli, img, 1)
    assert any("reads to parse" in n for n in s["notes"]), s
    assert _restored(cli, s, tmp_path) == sha256(img)


def test_a_base_record_with_too_many_extension_records_is_refused(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A base record's attributes are held together with its extension records' while it is
    digested (about 27 KB parsed each): a guest naming one base from every slot of a huge
    MFT grew that without bound. Past MAX_EXTENSIONS (lowered to 2 here: three records are
    made extensions of a fourth) fs-digests is refused, and the volume read block by block."""
    from dissect.ntfs import NTFS

    from deltavault.tracking.volume import ntfs as ntfs_tracking
    from deltavault.tracking.volume.base import Rejected
    from deltavault.tracking.volume.readers import FileReader

    img = tmp_path / "n.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    run("mkntfs", "-F", "-Q", "-q", "-c", str(BS), str(img))
    for name in ("base", "x1", "x2", "x3"):
        (tmp_path / name).write_bytes(name.encode() * 100)
        run("ntfscp", "-q", str(img), str(tmp_path / name), name)
    with open(img, "r+b") as f:
        ntfs = NTFS(f)
        mft_at = ntfs.mft.get(0).attributes[0x80][0].header.dataruns()[0][0] * ntfs.cluster_size
        base = ntfs.mft.get("base").segment
        records = [ntfs.mft.get(n).offset for n in ("x1", "x2", "x3")]
        for off in records:
            f.seek(mft_at + off + 0x20)  # BaseFileRecordSegment
            f.write(struct.pack("<Q", base))
    monkeypatch.setattr(ntfs_tracking, "MAX_EXTENSIONS", 2)
    scanner = ntfs_tracking.NtfsScanner(FileReader(str(img)))
    with pytest.raises(Rejected, match=f"MFT record {base} has more than 2 extension records"):
        scanner.digest_scan(None)
    monkeypatch.setattr(ntfs_tracking, "MAX_EXTENSIONS", 3)
    scanner.digest_scan(None)  # within the bound: digested
