"""What a volume image holds: the file system at its start, or a partition table (GPT,
MBR) and the file system in each partition.

Read through a view, so only the pages with the signatures and the table are fetched.
File systems are told by their superblock magic; those a kernel (ext2/3/4, XFS, btrfs)
or ntfs-3g can mount read-only are the ones file-level restore accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deltavault.restore.mount.views import View
from deltavault.tracking.volume.readers import PositionedFile

MOUNTABLE = ("ext4", "xfs", "btrfs", "ntfs")


@dataclass(frozen=True)
class Partition:
    number: int
    offset: int
    size: int
    fstype: str  # one of MOUNTABLE, another name blkid would give, or "" (unknown)


def fs_type(view: View, offset: int = 0, size: int | None = None) -> str:
    """The file system starting at ``offset``, by its signature; "" when none is known."""
    size = view.size - offset if size is None else size

    def at(pos: int, n: int) -> bytes:
        return view.read(offset + pos, n) if pos + n <= size else b""

    head = at(0, 4096)
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[:4] == b"XFSB":
        return "xfs"
    if at(1024 + 56, 2) == b"\x53\xef":
        return "ext4"  # ext2 and ext3 too: the ext4 driver mounts them all
    if at(65536 + 64, 8) == b"_BHRfS_M":
        return "btrfs"
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap"
    if at(512, 8) == b"LABELONE":
        return "LVM2_member"
    if head[54:59] == b"FAT16" or head[82:87] == b"FAT32" or head[54:59] == b"FAT12":
        return "vfat"
    return ""


class ViewFile(PositionedFile):
    """A read-only file object over a view, for the partition-table parser."""

    def __init__(self, view: View) -> None:
        super().__init__()
        self.view = view

    @property
    def size(self) -> int:
        return self.view.size

    def readinto(self, b: Any) -> int:
        data = self.view.read(self.pos, len(b))
        memoryview(b)[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _extent(part: Any, sector_size: int) -> tuple[int, int]:
    # dissect.volume 3.18 gives a GPT partition one sector too few; its entry's LBAs are exact.
    raw = getattr(part, "raw", None)
    first, last = getattr(raw, "first_lba", None), getattr(raw, "last_lba", None)
    if isinstance(first, int) and isinstance(last, int) and last >= first:
        return first * sector_size, (last - first + 1) * sector_size
    return int(part.offset), int(part.size)


def partitions(view: View) -> list[Partition]:
    """The partitions of a disk image; [] when a file system starts at offset 0 (an NTFS
    boot sector looks like an MBR) or there is no readable table."""
    if fs_type(view) in MOUNTABLE:
        return []
    from dissect.volume.disk import Disk

    try:
        table = Disk(ViewFile(view))
    except Exception:  # no table, or a damaged one: nothing to offer
        return []
    out: list[Partition] = []
    for i, part in enumerate(table.partitions):
        number = int(getattr(part, "number", i + 1) or i + 1)
        offset, size = _extent(part, table.sector_size)
        if size <= 0 or offset <= 0 or offset + size > view.size or any(p.number == number for p in out):
            continue
        if getattr(part, "type", None) is not None and "EXTENDED" in str(part.type).upper():
            continue  # the MBR container of logical partitions, not a file system
        out.append(Partition(number, offset, size, fs_type(view, offset, size)))
    return out
