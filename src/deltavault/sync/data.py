"""Moving file bytes: whole copies (sparse-aware) and the --verify read-back that bypasses
the page cache."""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Callable

import blake3

from deltavault.fs.clone import pread_full, pwrite_all
from deltavault.fs.sparse import data_extents, is_sparse

_ZEROS = bytes(1 << 20)


class SourceChanged(Exception):
    """The source file changed while it was copied; the caller retries."""


class SourceReadError(Exception):
    """Reading the source failed (an I/O error, a dying disk); writing is not at fault."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"read error: {exc.strerror or exc}")
        self.errno = exc.errno


def read_source(fd: int, buf: memoryview, offset: int) -> int:
    try:
        return pread_full(fd, buf, offset)
    except OSError as exc:
        raise SourceReadError(exc) from exc


class Cancelled(Exception):
    """The run is being stopped (Ctrl-C, --stop-on-error, a full disk)."""


def is_zero(buf: memoryview | bytes) -> bool:
    """All zero bytes? (Comparing memoryviews goes byte by byte in Python; bytes use memcmp.)"""
    return not buf or (not buf[0] and not buf[-1] and bytes(buf) == bytes(len(buf)))


def file_digest(fd: int, buf: memoryview,
                read: Callable[[int, memoryview, int], int] = pread_full) -> bytes:
    """BLAKE3 of a whole open file, read through ``buf`` (``read_source`` for a source file,
    so that a failing read is the source's)."""
    h = blake3.blake3(max_threads=1)
    off = 0
    while n := read(fd, buf, off):
        h.update(buf[:n])
        off += n
    return h.digest()


def hash_zeros(h: blake3.blake3, n: int) -> None:
    while n:
        k = min(n, len(_ZEROS))
        h.update(memoryview(_ZEROS)[:k])
        n -= k


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


def copy_data(sfd: int, tfd: int, st: os.stat_result, buffers: BufferPool,
              hasher: blake3.blake3 | None, cancelled: Callable[[], bool]) -> int:
    """Copy st.st_size bytes from sfd to tfd at the same offsets; holes stay holes.
    Returns the bytes written."""
    size = st.st_size
    extents = data_extents(sfd, size) if is_sparse(st) else ([(0, size)] if size else [])
    buf = buffers.get(0)
    pos = written = 0
    for off, length in extents:
        if hasher is not None and off > pos:
            hash_zeros(hasher, off - pos)
        o, end = off, off + length
        while o < end:
            if cancelled():
                raise Cancelled
            want = min(len(buf), end - o)
            n = read_source(sfd, buf[:want], o)
            if n < want:
                raise SourceChanged("it shrank while being copied")
            if hasher is not None:
                hasher.update(buf[:n])
            pwrite_all(tfd, buf[:n], o)
            o += n
            written += n
        pos = end
    if hasher is not None and size > pos:
        hash_zeros(hasher, size - pos)
    if pos < size or not extents:
        # A trailing hole. Only then: on XFS a truncate makes close() flush the file.
        os.ftruncate(tfd, size)
    return written


def read_back(path: bytes, bufsize: int) -> tuple[bytes, int, str]:
    """BLAKE3 and length of a file as stored: O_DIRECT where the file system allows it,
    else (e.g. tmpfs) after dropping its cached pages. Returns (digest, bytes, method).
    ``path`` names the file itself (``/proc/self/fd/N`` of a checked handle: fs.dirfd).
    The caller has fsynced the file."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    method = "direct"
    try:
        fd = os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fd = os.open(path, flags)
        method = "fadvise"
    h = blake3.blake3()
    total = 0
    size = max(4096, bufsize - bufsize % 4096)
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    mv = memoryview(buf)
    try:
        if method == "fadvise":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while True:
            try:
                n = os.preadv(fd, [mv], total)
            except OSError as exc:
                if exc.errno != errno.EINVAL or method != "direct":
                    raise
                # Some file systems accept O_DIRECT at open but not for this read.
                os.close(fd)
                fd = os.open(path, flags)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                method, h, total = "fadvise", blake3.blake3(), 0
                continue
            if n == 0:
                break
            h.update(mv[:n])
            total += n
    finally:
        mv.release()
        buf.close()
        os.close(fd)
    return h.digest(), total, method
