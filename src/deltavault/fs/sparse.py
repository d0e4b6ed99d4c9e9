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
