"""The compressed grains of a VMDK sparse extent (streamOptimized) checked to end within its
file. ``qemu-img map`` gives them no place in the file, so ``images.check_extents`` cannot
see one cut short; qemu fails only when it reads one (over NBD, as a dropped connection).
Read here: the extent's header (or its footer, when the header says the grain directory is
at the end), the grain directory and tables, and the marker (guest sector, compressed size)
of each grain near the end of the file: one further back cannot reach past it (a grain,
compressed, is at most a little over its own size).

Layout (VMware's "Virtual Disk Format 5.0", SparseExtentHeader, little-endian): magic
"KDMV", version, flags, capacity, grainSize, descriptorOffset, descriptorSize,
numGTEsPerGT, rgdOffset, gdOffset, overHead, ..., compressAlgorithm; sizes and offsets in
512-byte sectors.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from deltavault.errors import SourceError

_HEADER = struct.Struct("<4sIIQQQQIQQQ")
_GD_AT_END = 0xFFFFFFFFFFFFFFFF
_COMPRESSED = 1 << 16  # flags: grains are compressed, each behind a marker
_MARKER = struct.Struct("<QI")  # a compressed grain's guest sector and compressed size
_SECTOR = 512
_MAX_TABLES = 1 << 22  # grain tables a sane extent has at most (a 2 PiB disk of 64 KiB grains)
_MAX_GTES, _MAX_GRAIN = 512, 0x200000  # the limits qemu itself opens a VMDK with (sectors)


def check_compressed_grains(path: str, extent: str) -> None:
    """SourceError when a grain of the compressed extent file ``extent`` (of the image
    ``path``) ends past the end of that file."""
    try:
        fd = os.open(extent, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"{path}: its extent {extent}: {exc.strerror or exc}") from None
    try:
        _check(path, extent, fd, os.fstat(fd).st_size)
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


def _u32s(data: bytes, n: int, cut: Callable[[str, int], SourceError], what: str, end: int) -> tuple[int, ...]:
    if len(data) < 4 * n:  # (the file shrank since its size was taken)
        raise cut(what, end)
    return struct.unpack(f"<{n}I", data)


def _check(path: str, extent: str, fd: int, size: int) -> None:
    def cut(what: str, end: int) -> SourceError:
        return SourceError(f"{path}: truncated: its extent file {extent} is {size} bytes long, but {what} "
                           f"ends at byte {end}")

    head = _read(fd, _HEADER.size, 0)
    if len(head) < _HEADER.size:
        raise cut("its header", _HEADER.size)
    magic, _version, flags, capacity, grain, _d_off, _d_size, per_gt, _rgd, gd, _over = _HEADER.unpack(head)
    if magic != b"KDMV" or not flags & _COMPRESSED:
        return
    if gd == _GD_AT_END:  # the footer, a copy of the header 1024 bytes before the end, has it
        foot = _read(fd, _HEADER.size, size - 1024) if size >= 1024 else b""
        if len(foot) < _HEADER.size or foot[:4] != b"KDMV":
            raise cut("its footer", size + 1)
        gd = _HEADER.unpack(foot)[9]
    grain_bytes = grain * _SECTOR
    if not 0 < grain <= _MAX_GRAIN or not 0 < per_gt <= _MAX_GTES or -(-capacity // (grain * per_gt)) > _MAX_TABLES:
        raise SourceError(f"{path}: its extent file {extent} has a damaged header")
    tables = -(-capacity // (grain * per_gt))
    gd_end = gd * _SECTOR + 4 * tables
    if gd_end > size:
        raise cut("its grain directory", gd_end)
    near_end = size - 2 * grain_bytes - 4096  # a grain starting before this ends within the file
    directory = _u32s(_read(fd, 4 * tables, gd * _SECTOR), tables, cut, "its grain directory", gd_end)
    for t, gt in enumerate(directory):
        if not gt:
            continue
        gt_end = gt * _SECTOR + 4 * per_gt
        if gt_end > size:
            raise cut(f"its grain table {t}", gt_end)
        entries = _u32s(_read(fd, 4 * per_gt, gt * _SECTOR), per_gt, cut, f"its grain table {t}", gt_end)
        for g, at in enumerate(entries):
            if at <= 1 or at * _SECTOR < near_end:  # (0: not stored; 1: a zero grain)
                continue
            marker = _read(fd, _MARKER.size, at * _SECTOR)
            guest = (t * per_gt + g) * grain_bytes
            where = f"the grain holding the disk's bytes {guest}..{guest + grain_bytes}"
            if len(marker) < _MARKER.size:
                raise cut(where, at * _SECTOR + _MARKER.size)
            end = at * _SECTOR + _MARKER.size + _MARKER.unpack(marker)[1]
            if end > size:
                raise cut(where, end)
