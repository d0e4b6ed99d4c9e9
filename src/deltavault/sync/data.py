"""File bytes, as both sides handle them: reused buffers, a file read in chunks with its
holes found (SEEK_DATA/SEEK_HOLE), whole copies that keep holes, digests, runs of zeros.
A read that fails (SourceReadError) is told apart from a write that fails."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import blake3

from deltavault.fs.clone import pread_full, pwrite_all
from deltavault.fs.sparse import PAGE, ReadExtents, is_sparse

_ZEROS = bytes(1 << 20)


class SourceChanged(Exception):
    """The source file changed while it was read; the caller tries again."""


class SourceReadError(Exception):
    """Reading the source failed (an I/O error, a dying disk); writing is not at fault."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"read error: {exc.strerror or exc}")
        self.errno = exc.errno


class Cancelled(Exception):
    """The run is being stopped (Ctrl-C, --stop-on-error, a full disk)."""


def read_source(fd: int, buf: memoryview, offset: int) -> int:
    try:
        return pread_full(fd, buf, offset)
    except OSError as exc:
        raise SourceReadError(exc) from exc


class BufferPool:
    """Per-thread I/O buffers, reused across files (allocation costs more than copying)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._local = threading.local()

    def get(self, slot: int = 0) -> memoryview:
        bufs: dict[int, memoryview] | None = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        if slot not in bufs:
            bufs[slot] = memoryview(bytearray(self.size))
        return bufs[slot]


def is_zero(buf: memoryview | bytes) -> bool:
    """All zero bytes? (Comparing memoryviews goes byte by byte in Python; bytes use memcmp.)"""
    return not buf or (not buf[0] and not buf[-1] and bytes(buf) == bytes(len(buf)))


def hash_zeros(h: blake3.blake3, n: int) -> None:
    """Feed ``n`` zero bytes (a hole) to ``h``."""
    while n:
        k = min(n, len(_ZEROS))
        h.update(memoryview(_ZEROS)[:k])
        n -= k


def file_digest(fd: int, buf: memoryview,
                read: Callable[[int, memoryview, int], int] = pread_full) -> bytes:
    """BLAKE3 of an open file, read through ``buf`` (``read_source`` for a source file, so
    that a failing read is the source's): of its bytes up to its size now (fewer if it
    shrinks), never further, so a file its owner keeps extending (a truncate to a larger
    size, again and again) cannot keep the reader going for ever. Whoever needs the digest
    of one version compares the file's fstat before and after."""
    h = blake3.blake3(max_threads=1)
    for data in read_upto(fd, buf, os.fstat(fd).st_size, read):
        h.update(data)
    return h.digest()


def read_upto(fd: int, buf: memoryview, size: int,
              read: Callable[[int, memoryview, int], int] = pread_full) -> Iterator[memoryview]:
    """The bytes of ``fd`` from 0 up to ``size`` (its size when opened, say; fewer if it
    ends sooner), as views of ``buf`` (each valid until the next): never further, whatever
    the file has grown to, so its owner extending it cannot keep the reader going, and no
    more than ``buf`` is held at once."""
    off = 0
    while off < size and (n := read(fd, buf[:min(len(buf), size - off)], off)):
        yield buf[:n]
        off += n


def copy_upto(sfd: int, tfd: int, size: int, buf: memoryview) -> int:
    """Copy ``read_upto`` ``size`` bytes of ``sfd`` to ``tfd`` at the same offsets, through
    ``buf``; returns the bytes copied."""
    off = 0
    for data in read_upto(sfd, buf, size):
        pwrite_all(tfd, data, off)
        off += len(data)
    return off


def same_upto(a: int, b: int, size: int, buf: memoryview, other: memoryview) -> bool:
    """The first ``size`` bytes of ``a`` and ``b`` are there and equal, compared through the
    two buffers (of one size) without holding more."""
    off = 0
    for data in read_upto(a, buf, size):
        n = len(data)
        if pread_full(b, other[:n], off) != n or bytes(data) != bytes(other[:n]):  # (memcmp)
            return False
        off += n
    return off == size


def chunks(fd: int, st: os.stat_result, buf: memoryview,
           cancelled: Callable[[], bool] | None = None) -> Iterator[tuple[int, int, memoryview | None]]:
    """The file's ``st.st_size`` bytes in order, as (offset, length, data) with data a view
    of ``buf`` (valid until the next chunk), or None for a hole (zeros never read).
    SourceChanged if it shrinks meanwhile; Cancelled when ``cancelled()`` says so. The data
    extents are found one at a time (``ReadExtents``, every hole of a page or more kept): a
    file of millions of them (its owner writing every other page) costs no list of them."""
    size = st.st_size
    extents = ReadExtents(fd, size, is_sparse(st), PAGE, min_hole=PAGE).ranges()
    pos = 0
    for off, length in extents:
        if off > pos:
            yield pos, off - pos, None
        o, end = off, off + length
        while o < end:
            if cancelled is not None and cancelled():
                raise Cancelled
            want = min(len(buf), end - o)
            n = read_source(fd, buf[:want], o)
            if n < want:
                raise SourceChanged("it shrank while being copied")
            yield o, n, buf[:n]
            o += n
        pos = end
    if size > pos:
        yield pos, size - pos, None


def copy_data(sfd: int, tfd: int, st: os.stat_result, buffers: BufferPool,
              hasher: blake3.blake3 | None, cancelled: Callable[[], bool]) -> int:
    """Copy st.st_size bytes from sfd to tfd at the same offsets; holes stay holes.
    Returns the bytes written."""
    size = st.st_size
    written = data_end = 0
    for off, n, data in chunks(sfd, st, buffers.get(0), cancelled):
        if data is None:
            if hasher is not None:
                hash_zeros(hasher, n)
            continue
        if hasher is not None:
            hasher.update(data)
        pwrite_all(tfd, data, off)
        written += n
        data_end = off + n
    if data_end < size or not size:
        # A trailing hole. Only then: on XFS a truncate makes close() flush the file.
        os.ftruncate(tfd, size)
    return written
