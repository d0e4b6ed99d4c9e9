"""Partitioned volumes (GPT, MBR): file-system awareness per partition.

VM disks usually hold a partition table, not a file system at offset 0. The table is parsed
with dissect.volume. Each partition whose start is page-aligned and that holds an ext4 or
NTFS file system gets its own scanner over an offset reader; the composite answers for the
whole disk in disk pages. Everything that is not a page wholly inside such a partition (the
table, gaps, unknown or untrusted partitions, a partition's unaligned tail) counts as
allocated and must-read, so the composite stays a superset of what changed.

Digest keys carry the partition's number in their top bits, so the state of one partition
never vouches for another, and the composite's uuid lists every partition's file-system uuid:
any change to the layout makes the stored digests belong to another "file system", and the
run falls back to block digests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from pyroaring import BitMap

from deltavault.errors import DeltavaultError, SourceError
from deltavault.model.content import PAGE_SIZE
from deltavault.model.volume import FsInfo, Partition
from deltavault.tracking.volume import pagesets
from deltavault.tracking.volume.base import UNITS, Allocation, DigestScan, FsScanner
from deltavault.tracking.volume.readers import ReaderFile, VolumeReader

Probe = Callable[[VolumeReader], tuple[FsScanner | None, str]]
KIND = "partitions"
KEY_SHIFT = 48  # inode and MFT record numbers stay below 2**48
MAX_PARTITIONS = 1 << 15


TABLE_READS = 1 << 14  # a GPT of 16,000 entries (128 is usual), read one at a time, and its MBR


class TableFile(ReaderFile):
    """The volume as dissect.volume reads its partition table, for at most TABLE_READS
    reads. The table is the guest's: dissect reads as many GPT entries as the header
    claims (2^32, of any size, 0 included: the same entry again and again) and follows
    extended partitions recursively (an EBR naming itself four times fans out without
    end). The reads are bounded here, whatever the scheme does with them."""

    def __init__(self, reader: VolumeReader) -> None:
        super().__init__(reader)
        self.reads = 0

    def pread(self, offset: int, length: int) -> bytes:
        self.reads += 1
        if self.reads > TABLE_READS:
            raise ValueError(f"the partition table took more than {TABLE_READS} reads")
        return super().pread(offset, length)


class OffsetReader:
    """One partition of a volume, read through the volume's reader."""

    def __init__(self, parent: VolumeReader, offset: int, size: int, description: str) -> None:
        self.parent = parent
        self.offset = offset
        self.size = size
        self.description = description
        self.bytes_read = 0

    def read_into(self, buf: memoryview, offset: int) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise SourceError(f"{self.description}: read of {len(buf)} bytes at {offset} is outside "
                              f"the partition ({self.size} bytes)")
        self.parent.read_into(buf, self.offset + offset)
        self.bytes_read += len(buf)

    def zero_pages(self) -> BitMap:
        return BitMap()

    def close(self) -> None:
        pass


@dataclass
class Part:
    number: int
    first_page: int
    pages: int  # pages wholly inside the partition
    scanner: FsScanner


def _shift(pages: BitMap, part: Part) -> BitMap:
    """A partition's pages as disk pages, dropping any past its last whole page."""
    return pagesets.clamp(pages, 0, part.pages).shift(part.first_page)


class PartitionedScanner:
    kind = KIND

    def __init__(self, size: int, parts: list[Part], skipped: list[str],
                 table: list[Partition] | None = None) -> None:
        self.total = pagesets.pages_of(size)
        self.parts = [p for p in parts if not p.scanner.distrust]
        kinds = {p.number: p.scanner.kind for p in self.parts}
        # every partition of the table, for reports (the manifest's ``partitions``)
        self.table = [msgspec.structs.replace(t, fs=kinds.get(t.number, "")) for t in table or []]
        self.skipped = skipped + [f"partition {p.number}: {p.scanner.kind} {p.scanner.distrust}"
                                  for p in parts if p.scanner.distrust]
        self.info = FsInfo(type=KIND, uuid=" ".join(f"{p.number}:{p.scanner.kind}:{p.scanner.info.uuid}"
                                                    for p in self.parts),
                           unit=PAGE_SIZE, units=self.total)
        self.distrust = "" if self.parts else "no partition it can read: " + "; ".join(self.skipped)

    def _outside(self) -> BitMap:
        """Disk pages that no trusted partition answers for."""
        out = pagesets.span(0, self.total)
        for p in self.parts:
            out -= pagesets.span(p.first_page, p.first_page + p.pages)
        return out

    def allocation(self) -> Allocation:
        allocated = self._outside()
        for p in self.parts:
            a = p.scanner.allocation()
            allocated |= _shift(a.allocated, p)
            allocated |= pagesets.span(p.first_page + min(a.fs_pages, p.pages), p.first_page + p.pages)
        return Allocation(self.info, self.total, allocated)

    def digest_scan(self, prev: dict[int, bytes] | None) -> DigestScan:
        must = self._outside()
        digests: dict[int, bytes] = {}
        objects = changed = 0
        details: list[str] = []
        for p in self.parts:
            mine = None
            if prev is not None:
                mine = {k & ((1 << KEY_SHIFT) - 1): v for k, v in prev.items() if k >> KEY_SHIFT == p.number}
            scan = p.scanner.digest_scan(mine or None)
            must |= _shift(scan.must_read, p)
            digests.update(((p.number << KEY_SHIFT) | k, v) for k, v in scan.digests.items())
            objects += scan.objects
            changed += scan.changed_objects
            details.append(f"partition {p.number} ({p.scanner.kind}): {scan.changed_objects} of "
                           f"{scan.objects} {UNITS.get(p.scanner.kind, 'objects')} changed")
        return DigestScan(digests, must, objects, changed, details)


def _extent(part: Any, sector_size: int) -> tuple[int, int]:
    """(offset, size) in bytes. A GPT entry's last LBA is inclusive; dissect.volume 3.18
    gives one sector less as the size, so it is taken from the entry itself."""
    raw = getattr(part, "raw", None)
    first, last = getattr(raw, "first_lba", None), getattr(raw, "last_lba", None)
    if isinstance(first, int) and isinstance(last, int) and last >= first:
        return first * sector_size, (last - first + 1) * sector_size
    return int(part.offset), int(part.size)


def detect_partitions(reader: VolumeReader, probe: Probe) -> tuple[FsScanner | None, str]:
    """A PartitionedScanner when ``reader`` holds a partition table with at least one
    partition that ``probe`` finds a file system in."""
    from dissect.volume.disk import Disk

    fh = TableFile(reader)
    try:
        table = Disk(fh)
    except DeltavaultError:
        raise
    except Exception:  # no table, or a damaged one: not an error, just no awareness
        if fh.reads > TABLE_READS:
            return None, (f"a partition table that takes more than {TABLE_READS} reads to parse (an entry "
                          "count or a chain of extended partitions without end): not used")
        return None, "no partition table and no ext2/3/4 or NTFS file system at the start of the volume"
    parts: list[Part] = []
    skipped: list[str] = []
    found: list[Partition] = []
    for part in table.partitions:
        number = int(getattr(part, "number", len(parts) + len(skipped) + 1))
        offset, size = _extent(part, table.sector_size)
        if size <= 0 or number >= MAX_PARTITIONS or offset + size > reader.size:
            skipped.append(f"partition {number}: outside the volume or empty")
            continue
        found.append(Partition(number=number, offset=offset, size=size))
        if offset % PAGE_SIZE:
            skipped.append(f"partition {number}: starts at {offset}, not on a 4 KiB boundary")
            continue
        first, end = offset // PAGE_SIZE, (offset + size) // PAGE_SIZE
        if any(first < q.first_page + q.pages and q.first_page < end for q in parts):
            # two file systems cannot both vouch for one page
            skipped.append(f"partition {number}: overlaps another partition")
            continue
        sub = OffsetReader(reader, offset, size, f"{reader.description} partition {number}")
        scanner, why = probe(sub)
        if scanner is None:
            skipped.append(f"partition {number}: {why}")
            continue
        parts.append(Part(number, first, end - first, scanner))
    if not parts:
        return None, ("a partition table, but no partition it can read"
                      + (": " + "; ".join(skipped) if skipped else ""))
    return PartitionedScanner(reader.size, parts, skipped, found), ""


def layout(size: int, scanner: FsScanner | None) -> list[Partition]:
    """The volume's partitions as a manifest records them for reports: the table's entries
    (when the table was read), or one file system from offset 0 as number 0."""
    if isinstance(scanner, PartitionedScanner):
        return scanner.table
    if scanner is None:
        return []
    fs_size = min(size, scanner.info.unit * scanner.info.units) or size
    return [Partition(number=0, offset=0, size=fs_size, fs="" if scanner.distrust else scanner.kind)]
