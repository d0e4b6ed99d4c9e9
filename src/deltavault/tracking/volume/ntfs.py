"""NTFS metadata through dissect.ntfs: $Bitmap for allocation, a digest per MFT file record.

In the style of Veeam's MFT digests: each file's digest covers its $STANDARD_INFORMATION
(creation, modification and MFT-change times, attributes; not the access time), its record
sequence number and every $DATA attribute record whole (sizes, flags and the data runs).
Writing a file changes its times; moving its data changes its runs. An unchanged digest
therefore vouches for the clusters of the file's $DATA runs, and only for those: the MFT,
$LogFile, $Bitmap, directory indexes (whose entries NTFS updates without touching the
directory's own times), $Extend files and everything else in use are read every time.
A file changed within a second of the newest MFT-change time on the volume gets a digest
that matches nothing (racy.py): rewritten within one clock tick after the capture, its
record would be the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import blake3
from dissect.ntfs import NTFS
from dissect.ntfs.attr import Attribute
from dissect.ntfs.c_ntfs import (
    ATTRIBUTE_TYPE_CODE,
    FILE_NUMBER_BITMAP,
    FILE_NUMBER_EXTEND,
    FILE_NUMBER_MFT,
    FILE_NUMBER_VOLUME,
    FILE_RECORD_SEGMENT_IN_USE,
)
from dissect.ntfs.mft import MftRecord
from dissect.ntfs.util import segment_reference
from pyroaring import BitMap

from deltavault.model.content import PAGE_SIZE
from deltavault.model.volume import FsInfo
from deltavault.tracking.volume import pagesets
from deltavault.tracking.volume.base import Allocation, DigestScan, Rejected, refuse_shared
from deltavault.tracking.volume.racy import Racy
from deltavault.tracking.volume.readers import ReaderFile, VolumeReader

DIGEST = 16
FIRST_USER_RECORD = 24  # 0-15 are system files, 16-23 reserved
VOLUME_IS_DIRTY = 0x0001
_SI_ACCESS_TIME = slice(24, 32)  # STANDARD_INFORMATION.LastAccessTime
_SI_CHANGE_TIME = slice(16, 24)  # STANDARD_INFORMATION.ChangeTime (of the MFT record)
_FILETIME_UNIX = 11644473600  # seconds from 1601 (FILETIME's epoch) to 1970
_VOLUME_FLAGS = slice(10, 12)  # VOLUME_INFORMATION.Flags
CHUNK_RECORDS = 4096  # MFT records read at a time (4 MiB of 1 KiB records)
# Extension records one base may have: its attributes are held together while it is digested.
# A heavily fragmented file needs one per ~100 runs; NTFS's attribute list names at most ~8,000.
MAX_EXTENSIONS = 1024
# Attribute type codes as ints: the keys of dissect's AttributeMap (its enum does not hash as one).
_STANDARD_INFORMATION = ATTRIBUTE_TYPE_CODE.STANDARD_INFORMATION.value
_FILE_NAME = ATTRIBUTE_TYPE_CODE.FILE_NAME.value
_DATA = ATTRIBUTE_TYPE_CODE.DATA.value

Attributes = dict[int, list[Attribute]]  # type code -> attributes, in record order


def probe(reader: VolumeReader) -> bool:
    if reader.size < 512:
        return False
    buf = bytearray(8)
    reader.read_into(memoryview(buf), 3)
    return bytes(buf) == b"NTFS    "


class NtfsScanner:
    kind = "ntfs"

    def __init__(self, reader: VolumeReader) -> None:
        self.reader = reader
        self.fh = ReaderFile(reader)
        self.ntfs = NTFS(self.fh)
        if self.ntfs.mft is None:
            raise ValueError("no $MFT")
        self.cs = self.ntfs.cluster_size
        boot = self.ntfs.boot_sector
        self.clusters = boot.NumberSectors * self.ntfs.sector_size // self.cs
        self.info = FsInfo(type="ntfs", uuid=f"{boot.SerialNumber:016x}", unit=self.cs, units=self.clusters)
        self._alloc: Allocation | None = None
        self.distrust = self._why_not_trusted()

    def _why_not_trusted(self) -> str:
        vol = self.ntfs.mft.get(FILE_NUMBER_VOLUME)
        info = vol.attributes[ATTRIBUTE_TYPE_CODE.VOLUME_INFORMATION]
        if info:
            flags = int.from_bytes(info[0].data()[_VOLUME_FLAGS], "little")
            if flags & VOLUME_IS_DIRTY:
                return "the volume is marked dirty (in use, or not cleanly unmounted)"
        if self.clusters * self.cs > self.reader.size:
            return "the file system is larger than the volume"
        return ""

    def allocation(self) -> Allocation:
        if self._alloc is None:
            # a bit per cluster: no more is read, whatever size the guest gave $Bitmap
            bitmap = self.ntfs.mft.get(FILE_NUMBER_BITMAP).open().read(-(-self.clusters // 8))
            alloc = BitMap()
            for s, e in pagesets.set_bit_runs(bitmap, self.clusters):
                pagesets.add_bytes(alloc, s * self.cs, e * self.cs, outward=True)
            # The backup boot sector sits past the last cluster: outside fs_pages, so read.
            self._alloc = Allocation(self.info, self.clusters * self.cs // PAGE_SIZE, alloc)
        return self._alloc

    def _slots(self) -> Iterator[tuple[int, bytes]]:
        """(number, raw bytes) of every record slot of the MFT, a chunk at a time: an MFT
        holds a record per file (1 GiB for a million files), and its size is the guest's."""
        rs = self.ntfs._record_size
        count = min(self.ntfs.mft.get(FILE_NUMBER_MFT).size(), self.clusters * self.cs) // rs
        fh = self.ntfs.mft.fh
        for first in range(0, count, CHUNK_RECORDS):
            fh.seek(first * rs)
            data = fh.read(min(CHUNK_RECORDS, count - first) * rs)
            for i in range(len(data) // rs):
                yield first + i, data[i * rs:(i + 1) * rs]

    @staticmethod
    def _parse(n: int, raw: bytes) -> MftRecord | None:
        """A record in use, parsed without an NTFS object: dissect then does not follow
        $ATTRIBUTE_LIST entries, which a guest can make loop or fan out without end (each
        list's entries parse other records' lists again). Extension records are found by
        their base reference instead (``_records``)."""
        if raw[:4] != b"FILE":
            return None
        rec = MftRecord.from_bytes(raw, None)
        rec.segment = n
        return rec if rec.header.Flags & FILE_RECORD_SEGMENT_IN_USE else None

    @staticmethod
    def _gather(into: Attributes, rec: MftRecord) -> None:
        for code, group in rec.attributes.items():
            into.setdefault(code, []).extend(group)

    def _records(self) -> Iterator[tuple[MftRecord, Attributes]]:
        """Base records in use, each with its attributes and its extension records', by
        type code (the base record's first, then each extension's in record order). An
        extension record is read again when its base is reached, not kept from the first
        pass: a guest can make every slot of a huge MFT one. A base's attributes, its
        extensions' included, are held together (about 27 KB parsed per extension record):
        a base with more than MAX_EXTENSIONS is refused (Rejected: the volume is read block
        by block), so that stays within about 28 MB."""
        extensions: dict[int, list[int]] = {}
        for n, raw in self._slots():
            rec = self._parse(n, raw)
            if rec is not None and (base := segment_reference(rec.header.BaseFileRecordSegment)):
                named = extensions.setdefault(base, [])
                named.append(n)
                if len(named) > MAX_EXTENSIONS:
                    raise Rejected(f"MFT record {base} has more than {MAX_EXTENSIONS} extension records "
                                   "(their attributes are held together)")
        rs = self.ntfs._record_size
        fh = self.ntfs.mft.fh
        for n, raw in self._slots():
            rec = self._parse(n, raw)
            if rec is None or segment_reference(rec.header.BaseFileRecordSegment) != 0:
                continue
            attrs: Attributes = {}
            self._gather(attrs, rec)
            for e in extensions.get(n, ()):
                fh.seek(e * rs)
                ext = self._parse(e, fh.read(rs))
                if ext is not None:
                    self._gather(attrs, ext)
            yield rec, attrs

    @staticmethod
    def _is_special(rec: MftRecord, attrs: Attributes) -> bool:
        if rec.segment is None or rec.segment < FIRST_USER_RECORD:
            return True
        names = attrs.get(_FILE_NAME, [])
        return not names or any(
            segment_reference(a.attribute.attr.ParentDirectory) == FILE_NUMBER_EXTEND for a in names)

    def _runs(self, attr: Attribute, n: int) -> list[tuple[int, int]]:
        hdr = attr.header
        if hdr.resident:
            return []
        out = [(lcn, count) for lcn, count in hdr.dataruns() if lcn is not None]
        for lcn, count in out:
            if lcn < 0 or count < 0 or lcn + count > self.clusters:
                raise Rejected(f"MFT record {n}: a run of clusters {lcn}+{count} lies outside the "
                               f"file system ({self.clusters} clusters)")
        return out

    def _add(self, bm: BitMap, runs: list[tuple[int, int]], *, outward: bool) -> None:
        for lcn, count in runs:
            pagesets.add_bytes(bm, lcn * self.cs, (lcn + count) * self.cs, outward=outward)

    def digest_scan(self, prev: dict[int, bytes] | None) -> DigestScan:
        digests: dict[int, bytes] = {}
        unchanged = BitMap()
        others = BitMap()  # every page some other owner (metadata, a changed file) has a cluster in
        changed = files = 0
        racy = Racy([])
        for rec, attrs in self._records():
            n = rec.segment
            assert n is not None
            h = blake3.blake3()
            h.update(rec.header.SequenceNumber.to_bytes(2, "little"))
            ctime: int | None = None
            for si in attrs.get(_STANDARD_INFORMATION, ()):
                value = bytearray(si.data())
                value[_SI_ACCESS_TIME] = bytes(8)
                h.update(value)
                if len(value) >= _SI_CHANGE_TIME.stop:
                    ctime = int.from_bytes(value[_SI_CHANGE_TIME], "little") // 10**7 - _FILETIME_UNIX
            runs: list[tuple[int, int]] = []
            data_attrs = sorted(attrs.get(_DATA, ()), key=lambda a: (a.header.name, a.header.lowest_vcn or 0))
            for a in data_attrs:
                hdr = a.header
                hdr.fh.seek(hdr.offset)
                h.update(hdr.fh.read(hdr.record_length))
                runs.extend(self._runs(a, n))
            for code, group in attrs.items():  # index allocations, non-resident lists, $EA, ...: metadata
                if code != _DATA:
                    for a in group:
                        self._add(others, self._runs(a, n), outward=True)
            d = h.digest(DIGEST)
            digests[n] = d
            racy.see(n, ctime)  # (a system file's time counts towards the newest too)
            if self._is_special(rec, attrs):
                self._add(others, runs, outward=True)
                continue  # always read; not counted as a file
            files += 1
            if prev is None or prev.get(n) != d:
                changed += 1
                self._add(others, runs, outward=True)
                continue
            self._add(unchanged, runs, outward=False)
        racy.mark(digests)  # a digest no file's equals, for those its times cannot vouch for
        refuse_shared(unchanged, others, "byte", 1)
        # Everything no unchanged file vouches for: free space and whatever lies past
        # the file system too (free space is left out later, if it is skipped).
        everything = pagesets.span(0, pagesets.pages_of(self.reader.size))
        return DigestScan(digests, everything - unchanged, objects=files, changed_objects=changed)
