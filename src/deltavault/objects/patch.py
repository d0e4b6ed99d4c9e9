"""Patch blobs: byte ranges that replace parts of a base blob of the same size.

Layout: MAGIC(5) | count(u32 LE) | count x (offset u32, length u32) | data of each range
Ranges are sorted, non-overlapping and lie inside the base.
"""

from __future__ import annotations

import struct

from deltavault.errors import FormatError

MAGIC = b"DVPT\x01"
PATCH_LEVEL = 3  # patches are small: spend a little more on compressing them
# A chunk (file) or block (volume) whose patches would cover more than this share of its
# pages is stored whole instead.
MAX_PATCH_SHARE = 0.5
_COUNT = struct.Struct("<I")
_RANGE = struct.Struct("<II")


def encode_patch(pieces: list[tuple[int, bytes | memoryview]]) -> bytes:
    out = bytearray(MAGIC)
    out += _COUNT.pack(len(pieces))
    for off, data in pieces:
        out += _RANGE.pack(off, len(data))
    for _off, data in pieces:
        out += data
    return bytes(out)


def decode_patch(blob: bytes, base_size: int) -> list[tuple[int, memoryview]]:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _COUNT.size:
        raise FormatError("patch blob: bad magic or truncated")
    (count,) = _COUNT.unpack_from(blob, len(MAGIC))
    pos = len(MAGIC) + _COUNT.size
    if count > base_size or pos + count * _RANGE.size > len(blob):
        raise FormatError("patch blob: bad range count")
    ranges = []
    last_end = 0
    for _ in range(count):
        off, ln = _RANGE.unpack_from(blob, pos)
        pos += _RANGE.size
        if off < last_end or ln == 0 or off + ln > base_size:
            raise FormatError("patch blob: range out of order or out of bounds")
        last_end = off + ln
        ranges.append((off, ln))
    mv = memoryview(blob)
    out = []
    for off, ln in ranges:
        if pos + ln > len(blob):
            raise FormatError("patch blob: truncated data")
        out.append((off, mv[pos:pos + ln]))
        pos += ln
    if pos != len(blob):
        raise FormatError("patch blob: trailing bytes")
    return out


def apply_patches(base: bytes, patches: list[bytes], size: int) -> bytes:
    if len(base) != size:
        raise FormatError(f"patch base has {len(base)} bytes, expected {size}")
    buf = bytearray(base)
    for p in patches:
        for off, data in decode_patch(p, size):
            buf[off:off + len(data)] = data
    return bytes(buf)


def coalesce(pages: list[int], region_start: int, region_size: int, page_size: int) -> list[tuple[int, int]]:
    """Absolute page numbers -> (offset, length) ranges relative to the region, clipped."""
    out: list[tuple[int, int]] = []
    region_end = region_start + region_size
    for p in pages:
        s = max(p * page_size, region_start) - region_start
        e = min((p + 1) * page_size, region_end) - region_start
        if e <= s:
            continue
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + e - s)
        else:
            out.append((s, e - s))
    return out


def bitmap(pages: list[int], first: int, count: int) -> bytes:
    """``Patch.pages`` of a chunk or block whose first page is ``first``: bit i is page first + i."""
    bm = bytearray((count + 7) // 8)
    for p in pages:
        j = p - first
        bm[j >> 3] |= 1 << (j & 7)
    return bytes(bm)


def bitmap_pages(bm: bytes, first: int) -> set[int]:
    """The absolute page numbers a ``Patch.pages`` bitmap names."""
    out = set()
    for i, byte in enumerate(bm):
        while byte:
            low = byte & -byte
            out.add(first + i * 8 + low.bit_length() - 1)
            byte ^= low
    return out
