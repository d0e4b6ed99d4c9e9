"""Per-page digests of large files, computed in a helper process.

Hashing 4 KiB pages one call at a time holds the GIL (about 2.5 us a page, half a second
for the 821 MB benchmark database), which stalls the threads that compress and encrypt.
A helper process does it beside them. It reads the file itself and returns the digests
only if the file's stat data is the same before and after its read and equals what the
main reader saw; otherwise the file gets no digests (the next run stores it whole).

Why a separate read is safe: the digests are used by the next run only if the file's
ctime lies before the racy window of the run that computed them (see
``FileArchiver._prev_digests``), so no write can have fallen between the two reads.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from deltavault.chunking.pages import PageHasher
from deltavault.fs.sparse import data_extents, page_aligned_extents
from deltavault.model.content import PAGE_SIZE

WINDOW = 8 * 1024 * 1024
Signature = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns

_hasher: PageHasher | None = None


def _init(key: bytes | None) -> None:
    global _hasher
    _hasher = PageHasher(key)


def _sig(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_digests(path: bytes, expect: Signature) -> bytes | None:
    """Digest of every absolute 4 KiB page; holes digest as zeros. None if the file is
    not the one the caller read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        if _sig(os.fstat(fd)) != expect:
            return None
        size = expect[1]
        hasher = _hasher or PageHasher(None)
        out = bytearray()
        pos = 0
        for start, ln in page_aligned_extents(data_extents(fd, size), size, PAGE_SIZE):
            end = start + ln
            if start > pos:
                out += hasher.zero_run(start - pos)
            while start < end:
                n = min(WINDOW, end - start)
                data = os.pread(fd, n, start)
                if len(data) != n:
                    return None
                out += hasher.digests(data)
                start += n
            pos = end
        if pos < size:
            out += hasher.zero_run(size - pos)
        if _sig(os.fstat(fd)) != expect:
            return None
        return bytes(out)
    except OSError:
        return None
    finally:
        os.close(fd)


class PageDigester:
    """One helper process, started on first use; falls back to this process if it cannot."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self._pool: ProcessPoolExecutor | None = None
        self._broken = False

    def submit(self, path: bytes, st: os.stat_result) -> Future[bytes | None]:
        if not self._broken:
            try:
                if self._pool is None:
                    ctx = multiprocessing.get_context("spawn")
                    self._pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=_init, initargs=(self.key,))
                return self._pool.submit(file_digests, path, _sig(st))
            except (OSError, BrokenProcessPool, RuntimeError):
                self._broken = True
        _init(self.key)
        fut: Future[bytes | None] = Future()
        fut.set_result(file_digests(path, _sig(st)))
        return fut

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
