"""Data/hole extents of a file via SEEK_DATA / SEEK_HOLE."""

from __future__ import annotations

import errno
import os


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of data regions. A file without holes gives [(0, size)]."""
    if size == 0:
        return []
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end - start))
            pos = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return [(0, size)]
        raise
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return out


def is_sparse(st: os.stat_result) -> bool:
    return st.st_blocks * 512 < st.st_size


def page_aligned_extents(extents: list[tuple[int, int]], size: int, page: int = 4096) -> list[tuple[int, int]]:
    """Round data extents out to page boundaries (clipped at ``size``) and merge overlaps."""
    out: list[tuple[int, int]] = []
    for off, ln in extents:
        s = off - off % page
        e = min(size, -(-(off + ln) // page) * page)
        if out and s <= out[-1][0] + out[-1][1]:
            ps, pl = out[-1]
            out[-1] = (ps, max(ps + pl, e) - ps)
        else:
            out.append((s, e - s))
    return out


def read_extents(fd: int, st: os.stat_result, page: int = 4096) -> list[tuple[int, int]]:
    """The page-aligned ranges a reader reads: the data extents of a sparse file, else all
    of it. One rule, so two readers of one file read the same ranges."""
    size = st.st_size
    return page_aligned_extents(data_extents(fd, size) if is_sparse(st) else [(0, size)], size, page)
