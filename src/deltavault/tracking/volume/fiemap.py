"""FIEMAP: a file's extents (logical offset -> physical address), and where two versions of
a file differ in their mapping."""

from __future__ import annotations

import fcntl
import struct
from dataclasses import dataclass

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, pad
_EXTENT = struct.Struct("=QQQQQIIII")  # fe_logical, fe_physical, fe_length, 2 reserved, fe_flags, 3 reserved
BATCH = 512

LAST = 0x1
UNKNOWN = 0x2
DELALLOC = 0x4
ENCODED = 0x8
NOT_ALIGNED = 0x100
DATA_INLINE = 0x200
UNWRITTEN = 0x800
SHARED = 0x2000
# Extents whose physical address does not pin their content: compressed (the offset into
# the decompressed extent is not reported), inline, not yet allocated.
_UNCOMPARABLE = UNKNOWN | DELALLOC | ENCODED | NOT_ALIGNED | DATA_INLINE


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int


def extents(fd: int, size: int) -> list[Extent]:
    out: list[Extent] = []
    pos = 0
    while pos < size:
        req = bytearray(_HEADER.size + BATCH * _EXTENT.size)
        _HEADER.pack_into(req, 0, pos, size - pos, FIEMAP_FLAG_SYNC, 0, BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, req, True)
        mapped = _HEADER.unpack_from(req, 0)[3]
        if mapped == 0:
            break
        last = False
        for i in range(mapped):
            lo, ph, ln, _r1, _r2, fl, _a, _b, _c = _EXTENT.unpack_from(req, _HEADER.size + i * _EXTENT.size)
            out.append(Extent(lo, ph, ln, fl))
            last = bool(fl & LAST)
        if last:
            break
        pos = out[-1].logical + out[-1].length
    return out


def changed_ranges(old: list[Extent], new: list[Extent], size: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of the new file whose content may differ from the old one.

    A range is unchanged where both map it to the same physical bytes the same way (both
    written or both unwritten), or where both have a hole."""
    same: list[tuple[int, int]] = []
    olds = sorted(old, key=lambda e: e.logical)
    j = 0
    for e in sorted(new, key=lambda e: e.logical):
        if e.flags & _UNCOMPARABLE:
            continue
        e_end = e.logical + e.length
        while j < len(olds) and olds[j].logical + olds[j].length <= e.logical:
            j += 1
        k = j
        while k < len(olds) and olds[k].logical < e_end:
            o = olds[k]
            if (not o.flags & _UNCOMPARABLE and o.physical - o.logical == e.physical - e.logical
                    and o.flags & UNWRITTEN == e.flags & UNWRITTEN):
                s, t = max(o.logical, e.logical), min(o.logical + o.length, e_end)
                if t > s:
                    same.append((s, t))
            k += 1
    # Holes in both files are zeros in both.
    same.extend(_intersect(_holes(olds, size), _holes(sorted(new, key=lambda e: e.logical), size)))
    same.sort()
    out: list[tuple[int, int]] = []
    pos = 0
    for s, t in same:
        if s > pos:
            out.append((pos, s))
        pos = max(pos, t)
    if pos < size:
        out.append((pos, size))
    return out


def _holes(ext: list[Extent], size: int) -> list[tuple[int, int]]:
    out = []
    pos = 0
    for e in ext:
        if e.logical > pos:
            out.append((pos, min(e.logical, size)))
        pos = max(pos, e.logical + e.length)
    if pos < size:
        out.append((pos, size))
    return out


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        s, t = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if t > s:
            out.append((s, t))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out
