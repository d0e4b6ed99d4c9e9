"""Data/hole extents of a file via SEEK_DATA / SEEK_HOLE."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

PAGE = 4096
# Holes shorter than this between two data extents are read as data (zeros). Each hole
# costs a content reference, so without a floor a hostile file of alternating 4 KiB data
# and 4 KiB holes would need one reference per 4 KiB: 26 million for 100 GiB, more memory
# than a backup may use and a tree blob over the restore limit. With it, a sparse file
# needs no more references than a dense one of the same size (chunks are >= 64 KiB too).
MIN_HOLE = 64 * 1024


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


class ReadExtents:
    """The ranges a reader of a file reads, found lazily, so that no list of a hostile
    file's millions of extents is ever built: the data extents of a sparse file rounded
    out to pages, with holes under ``MIN_HOLE`` merged into the data around them; all of
    a file that is not sparse. One rule for every reader of a file (the backup's reader
    and the page-digest helper must read the same ranges).

    ``first_after`` and ``ranges`` are meant for ascending positions: each answer is
    cached, and a query inside the cached range gets the same range back."""

    def __init__(self, fd: int, size: int, sparse: bool, page: int = PAGE, min_hole: int = MIN_HOLE) -> None:
        self.fd = fd
        self.size = size
        self.sparse = sparse
        self.page = page
        self.min_hole = min_hole
        self._asked = -1  # the query that found _found
        self._found: tuple[int, int] | None = None

    def _raw(self, pos: int) -> tuple[int, int] | None:
        """The next data extent at or after ``pos``, rounded out to pages."""
        try:
            start = os.lseek(self.fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return None
            if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                self.sparse = False  # no hole support: all of it is data
                return (pos - pos % self.page, self.size) if pos < self.size else None
            raise
        if start >= self.size:
            return None
        end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
        return start - start % self.page, min(self.size, -(-end // self.page) * self.page)

    def first_after(self, pos: int) -> tuple[int, int] | None:
        """(start, end) of the first range that ends after ``pos`` (start may be <= pos),
        or None when only holes follow."""
        if pos >= self.size:
            return None
        if not self.sparse:
            return (0, self.size)
        f = self._found
        if self._asked >= 0 and self._asked <= pos and (f is None or f[1] > pos):
            return f
        found = self._raw(pos)
        if found is not None:
            start, end = found
            while end < self.size:  # swallow holes too short to be worth a reference
                nxt = self._raw(end)
                if nxt is None or nxt[0] - end >= self.min_hole:
                    break
                end = max(end, nxt[1])
            found = (start, end)
        self._asked, self._found = pos, found
        return found

    def ranges(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """(offset, length) of each range within [start, end), in order."""
        stop = self.size if end is None else min(end, self.size)
        pos = start
        while pos < stop:
            found = self.first_after(pos)
            if found is None or found[0] >= stop:
                return
            s, e = max(found[0], pos), min(found[1], stop)
            yield s, e - s
            pos = e

    def has_data(self, start: int, end: int) -> bool:
        found = self.first_after(start)
        return found is not None and found[0] < end


