"""The sparse extents of a VMDK (hosted sparse, streamOptimized) walked here, with bounds,
instead of by ``qemu-img map``: their header is checked against the limits below, then each
grain must end within the extent file (qemu reads what lies past the end as zeros, or fails
only when it reads a compressed grain: over NBD, a dropped connection).

Why not the map: qemu asks each grain for its status, one call per grain, so its work
follows the grain count the header claims, not the file. A 16 MiB streamOptimized extent
claiming 1 TiB of 512-byte grains, its grain directory naming one table 4,194,304 times, is
2^31 calls (hours). Here the header is refused first (a grain below 8 sectors, or more grains
than the largest disk VMware makes); then the grain directory is read once and each grain
table it names once, however many entries name it: the work follows the file's size.

Layout (VMware's "Virtual Disk Format 5.0", SparseExtentHeader, little-endian): magic
"KDMV", version, flags, capacity, grainSize, descriptorOffset, descriptorSize,
numGTEsPerGT, rgdOffset, gdOffset, overHead, ..., compressAlgorithm; sizes and offsets in
512-byte sectors. A compressed grain sits behind a marker (guest sector, compressed size):
only those near the end of the file are read, as one further back cannot reach past it (a
grain, compressed, is at most a little over its own size).
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Callable

from deltavault.errors import SourceError

_HEADER = struct.Struct("<4sIIQQQQIQQQ")
_GD_AT_END = 0xFFFFFFFFFFFFFFFF
_ZERO_GRAIN = 1 << 2  # flags: a grain table entry of 1 is a grain of zeros
_COMPRESSED = 1 << 16  # flags: grains are compressed, each behind a marker
_MARKER = struct.Struct("<QI")  # a compressed grain's guest sector and compressed size
_SECTOR = 512
_MAX_TABLES = 1 << 22  # grain tables a sane extent has at most (a 2 PiB disk of 64 KiB grains)
_MAX_GTES, _MAX_GRAIN = 512, 0x200000  # the limits qemu itself opens a VMDK with (sectors)
MIN_GRAIN = 8  # sectors: VMware's specification asks a grain of at least 4 KiB; qemu takes 1
# Grains an extent may claim: an 8 TiB disk (the largest VMware Workstation makes) of 64 KiB
# grains, the grain every VMware and qemu writes. qemu asks each grain for its status when
# the disk is served, so this bounds that work too (a few seconds per 2^24 grains).
MAX_GRAINS = 1 << 27


def check_grains(path: str, extent: str, grain_bytes: int, capacity: int) -> int:
    """The number of grains of an extent of ``capacity`` bytes in grains of ``grain_bytes``;
    SourceError when they are too small, or too many, to be served in bounded time."""
    if grain_bytes < MIN_GRAIN * _SECTOR:
        raise SourceError(f"{path}: its extent {extent} has grains of {grain_bytes} bytes; a VMDK's grain is "
                          f"at least {MIN_GRAIN * _SECTOR} bytes (VMware's specification), and reading one "
                          "this small costs qemu a call per grain")
    grains = -(-capacity // grain_bytes)
    if grains > MAX_GRAINS:
        raise SourceError(f"{path}: its extent {extent} claims {grains} grains ({capacity} bytes in grains of "
                          f"{grain_bytes}); more than {MAX_GRAINS}, an 8 TiB disk of 64 KiB grains, are refused")
    return grains


def check_sparse_extent(path: str, extent: str) -> bool:
    """Check the sparse extent file ``extent`` (of the image ``path``): SourceError when its
    header claims too much or a grain, grain table or the grain directory ends past the end
    of the file. False if it is not a KDMV extent (nothing was checked)."""
    try:
        fd = os.open(extent, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"{path}: its extent {extent}: {exc.strerror or exc}") from None
    try:
        return _check(path, extent, fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _read(fd: int, n: int, off: int) -> bytes:
    out = b""
    while len(out) < n:
        got = os.pread(fd, n - len(out), off + len(out))
        if not got:
            break
        out += got
    return out


def _u32s(data: bytes, n: int, cut: Callable[[str, int], SourceError], what: str, end: int) -> array[int]:
    if len(data) < 4 * n:  # (the file shrank since its size was taken)
        raise cut(what, end)
    out = array("I", data)
    if out.itemsize != 4:  # pragma: no cover (every platform Linux runs on has 4-byte unsigned int)
        raise AssertionError("array 'I' is not 32 bits here")
    if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover (big-endian hosts)
        out.byteswap()
    return out


def _check(path: str, extent: str, fd: int, size: int) -> bool:
    def cut(what: str, end: int) -> SourceError:
        return SourceError(f"{path}: truncated: its extent file {extent} is {size} bytes long, but {what} "
                           f"ends at byte {end}")

    head = _read(fd, _HEADER.size, 0)
    if len(head) < _HEADER.size:
        raise cut("its header", _HEADER.size)
    if head[:4] != b"KDMV":
        return False
    if _HEADER.unpack(head)[9] == _GD_AT_END:
        # As qemu: the whole header is then the footer's, 1024 bytes before the end of the
        # file counted in whole sectors (a header that claims little and a footer that
        # claims 1 TiB of one-sector grains are read by qemu as the footer says).
        at = -(-size // _SECTOR) * _SECTOR - 1024
        head = _read(fd, _HEADER.size, at) if at >= _SECTOR else b""
        if len(head) < _HEADER.size or head[:4] != b"KDMV":
            raise cut("its footer", size + 1)
    _magic, _version, flags, capacity, grain, _d_off, _d_size, per_gt, _rgd, gd, _over = _HEADER.unpack(head)
    if not 0 < grain <= _MAX_GRAIN or not 0 < per_gt <= _MAX_GTES or -(-capacity // (grain * per_gt)) > _MAX_TABLES:
        raise SourceError(f"{path}: its extent file {extent} has a damaged header")
    grain_bytes = grain * _SECTOR
    check_grains(path, extent, grain_bytes, capacity * _SECTOR)
    tables = -(-capacity // (grain * per_gt))
    gd_end = gd * _SECTOR + 4 * tables
    if gd_end > size:
        raise cut("its grain directory", gd_end)
    compressed = bool(flags & _COMPRESSED)
    # A grain starting before this ends within the file: compressed, a marker and at most a
    # little over a grain; stored plainly, exactly a grain.
    safe = size - 2 * grain_bytes - 4096 if compressed else size - grain_bytes
    zero = 1 if flags & _ZERO_GRAIN or compressed else 0  # entries meaning "not stored here"
    seen: set[int] = set()
    checked: set[int] = set()  # grains near the end already found whole
    for t, gt in enumerate(_u32s(_read(fd, 4 * tables, gd * _SECTOR), tables, cut, "its grain directory", gd_end)):
        if not gt or gt in seen:  # a table named again holds the same places in the file
            continue
        seen.add(gt)
        gt_end = gt * _SECTOR + 4 * per_gt
        if gt_end > size:
            raise cut(f"its grain table {t}", gt_end)
        entries = _u32s(_read(fd, 4 * per_gt, gt * _SECTOR), per_gt, cut, f"its grain table {t}", gt_end)
        if max(entries) * _SECTOR <= safe:
            continue
        # Only distinct places near the end are looked at (set() runs in C): a grain starting
        # there lies within the last 2 grains and 4 KiB of the file, so there are few such
        # places, however many entries of however many tables name them.
        for at in sorted(set(entries) - checked):
            if at <= zero or at * _SECTOR <= safe:
                continue
            g = entries.index(at)
            guest = (t * per_gt + g) * grain_bytes
            n = min(grain_bytes, capacity * _SECTOR - guest)  # (the last grain may hold less of the disk)
            if n > 0:  # (past the disk's end: never read)
                _check_grain(fd, at * _SECTOR, compressed, n, size, cut,
                             f"the grain holding the disk's bytes {guest}..{guest + n}")
                checked.add(at)
    return True


def _check_grain(fd: int, at: int, compressed: bool, n: int, size: int,
                 cut: Callable[[str, int], SourceError], where: str) -> None:
    if not compressed:
        if at + n > size:
            raise cut(where, at + n)
        return
    marker = _read(fd, _MARKER.size, at)
    if len(marker) < _MARKER.size:
        raise cut(where, at + _MARKER.size)
    end = at + _MARKER.size + _MARKER.unpack(marker)[1]
    if end > size:
        raise cut(where, end)
