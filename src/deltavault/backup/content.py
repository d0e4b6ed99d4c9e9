"""Turning an open file into content references.

Three paths:
- small files: one read, FastCDC, chunks to the worker pool;
- big files: streamed in page-aligned windows through FastCDC; holes of sparse files
  become Hole references; files over the delta threshold also get per-page digests;
- large files whose previous version has page digests (a database, a VM image changed
  in place): the previous chunk boundaries are kept and each changed chunk is stored as
  a patch of its changed 4 KiB pages against its base blob.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3

from deltavault.backup.pagedigests import PageDigester
from deltavault.chunking.cdc import Chunker
from deltavault.chunking.pages import DIGEST, PageHasher
from deltavault.fs.sparse import data_extents, page_aligned_extents, read_extents
from deltavault.model.content import PAGE_SIZE, ContentRef, Full, Hole, Patch
from deltavault.model.types import BlobType
from deltavault.objects.patch import coalesce, encode_patch

WINDOW = 16 * 1024 * 1024
BATCH_BYTES = 4 * 1024 * 1024
BATCH_ITEMS = 128
PAGES_PER_DIGEST_BLOB = 16384  # 64 MiB of file per META blob
PATCH_LEVEL = 3  # patches are small: spend a little more on compressing them
# A chunk whose patch would cover more than this share of its pages is stored whole.
MAX_PATCH_SHARE = 0.5


class FileChanged(Exception):
    """The file changed size while being read; the caller retries."""


class BlobSaver(Protocol):
    def save_blob(self, btype: BlobType, data: bytes | memoryview, *, blob_id: bytes | None = None,
                  level: int | None = None, compress: bool = True) -> tuple[bytes, int]: ...

    def has_blob(self, blob_id: bytes) -> bool: ...


class Inflight:
    """Bounds the bytes queued for the worker pool."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class _Batch:
    """Small chunks sent to the workers as one task, with one event for all of them."""

    __slots__ = ("done_event", "error", "items", "results")

    def __init__(self) -> None:
        self.items: list[bytes | memoryview] = []
        self.results: list[ContentRef] = []
        self.error: BaseException | None = None
        self.done_event = threading.Event()


class Slot:
    """One chunk's place in a batch: a much lighter stand-in for a Future."""

    __slots__ = ("batch", "i")

    def __init__(self, batch: _Batch, i: int) -> None:
        self.batch, self.i = batch, i

    def done(self) -> bool:
        return self.batch.done_event.is_set()

    def result(self) -> ContentRef:
        self.batch.done_event.wait()
        if self.batch.error is not None:
            raise self.batch.error
        return self.batch.results[self.i]


@dataclass
class PendingContent:
    parts: list[ContentRef | Future[ContentRef] | Slot] = field(default_factory=list)
    # Page digests: computed here (delta path) or by the helper process, which also returns
    # its content hash of the file; kept only if it equals ``content_hash`` of our own read.
    digests: bytes | Future[tuple[bytes, bytes] | None] | None = None
    content_hash: bytes | None = None
    bytes_read: int = 0

    def refs(self) -> list[ContentRef]:
        return [p.result() if isinstance(p, (Future, Slot)) else p for p in self.parts]

    def digest_bytes(self) -> bytes | None:
        """The page digests, or None when there are none (or the helper could not vouch
        for them): the file is then stored whole by its next change."""
        d = self.digests
        if not isinstance(d, Future):
            return d
        try:
            res = d.result()
        except Exception:  # a dead helper process only costs digests
            return None
        if res is None or res[1] != self.content_hash:
            return None  # the helper read other bytes than we stored
        return res[0]


def _read_exact(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        piece = os.pread(fd, length - got, offset + got)
        if not piece:
            raise FileChanged("file shrank while being read")
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def bitmap(pages: list[int], first: int, count: int) -> bytes:
    bm = bytearray((count + 7) // 8)
    for p in pages:
        j = p - first
        bm[j >> 3] |= 1 << (j & 7)
    return bytes(bm)


def bitmap_pages(bm: bytes, first: int) -> set[int]:
    out = set()
    for i, byte in enumerate(bm):
        while byte:
            low = byte & -byte
            out.add(first + i * 8 + low.bit_length() - 1)
            byte ^= low
    return out


class ContentReader:
    def __init__(self, repo: BlobSaver, pool: ThreadPoolExecutor, chunker: Chunker, *,
                 page_key: bytes | None, delta_threshold: int, inflight: Inflight,
                 digester: PageDigester | None = None) -> None:
        self.repo = repo
        self.pool = pool
        self.chunker = chunker
        self.page_key = page_key
        self.delta_threshold = delta_threshold
        self.inflight = inflight
        self.digester = digester or PageDigester(page_key)
        self._pages = PageHasher(page_key)
        self._batch = _Batch()
        self._batch_bytes = 0

    # ------------------------------------------------------------------ helpers
    def _submit(self, fn: Callable[[Any], ContentRef], data: bytes | memoryview) -> Future[ContentRef]:
        n = len(data)
        self.inflight.acquire(n)
        fut = self.pool.submit(fn, data)
        fut.add_done_callback(lambda _f: self.inflight.release(n))
        return fut

    def _batched(self, data: bytes | memoryview) -> Slot:
        """Small chunks travel to the workers in batches: one task per batch, not per chunk."""
        b = self._batch
        b.items.append(data)
        self._batch_bytes += len(data)
        slot = Slot(b, len(b.items) - 1)
        if self._batch_bytes >= BATCH_BYTES or len(b.items) >= BATCH_ITEMS:
            self.flush_batch()
        return slot

    def flush_batch(self) -> None:
        if not self._batch.items:
            return
        batch, n = self._batch, self._batch_bytes
        self._batch, self._batch_bytes = _Batch(), 0
        self.inflight.acquire(n)
        task = self.pool.submit(self._run_batch, batch)
        task.add_done_callback(lambda _f: self.inflight.release(n))

    def _run_batch(self, batch: _Batch) -> None:
        try:
            batch.results = [self._save_full(data) for data in batch.items]
        except BaseException as exc:
            batch.error = exc
        finally:
            batch.items = []
            batch.done_event.set()

    def _save_full(self, data: bytes | memoryview) -> ContentRef:
        bid, _ = self.repo.save_blob(BlobType.DATA, data)
        return Full(bid, len(data))

    def _save_patch(self, base: bytes, size: int, bm: bytes) -> Callable[[bytes], ContentRef]:
        def job(patch: bytes) -> ContentRef:
            pid, _ = self.repo.save_blob(BlobType.DATA, patch, level=PATCH_LEVEL)
            return Patch(base, [pid], size, bm)
        return job

    # ------------------------------------------------------------------ entry point
    def read(self, fd: int, st: os.stat_result, prev_refs: list[ContentRef] | None,
             prev_digests: bytes | None, path: bytes | None = None) -> PendingContent:
        size = st.st_size
        if size == 0:
            return PendingContent()
        large = size >= self.delta_threshold
        if large and prev_refs and prev_digests is not None:
            return self._read_delta(fd, size, prev_refs, prev_digests)
        extents = read_extents(fd, st)
        if not large and extents == [(0, size)] and size <= self.chunker.params.max_size:
            data = _read_exact(fd, 0, size)
            out = PendingContent(bytes_read=size)
            if len(data) <= self.chunker.params.min_size:
                out.parts.append(self._batched(data))
            else:
                mv = memoryview(data)
                for off, ln in self.chunker.cut(data):
                    out.parts.append(self._batched(mv[off:off + ln]))
            return out
        digests = self.digester.submit(path, st, extents) if large and path is not None else None
        out = self._read_stream(fd, size, extents, blake3.blake3() if digests else None)
        out.digests = digests
        return out

    # ------------------------------------------------------------------ streaming
    def _stream(self, fd: int, start: int, length: int, out: PendingContent,
                content: blake3.blake3 | None) -> None:
        """Chunk [start, start+length) without copying: chunks are views of the read window.
        The unfinished chunk at a window's end is read again with the next window."""
        pos, end = start, start + length
        hashed = start
        while pos < end:
            data = _read_exact(fd, pos, min(WINDOW, end - pos))
            out.bytes_read += len(data)
            mv = memoryview(data)
            if content is not None:
                content.update(mv[hashed - pos:])  # each byte once, in order
                hashed = pos + len(data)
            cuts = self.chunker.cut(mv)
            if pos + len(data) < end and len(cuts) > 1:
                cuts.pop()  # it may end only because the window ended
                out.bytes_read -= len(data) - sum(ln for _, ln in cuts)
            for off, ln in cuts:
                out.parts.append(self._submit(self._save_full, mv[off:off + ln]))
            pos += sum(ln for _, ln in cuts)

    def _read_stream(self, fd: int, size: int, extents: list[tuple[int, int]],
                     content: blake3.blake3 | None = None) -> PendingContent:
        """``content``: hash (offset, then bytes) of each extent, as the digest helper does."""
        out = PendingContent()
        pos = 0
        for off, ln in extents:
            if off > pos:
                out.parts.append(Hole(off - pos))
            if content is not None:
                content.update(off.to_bytes(8, "little"))
            self._stream(fd, off, ln, out, content)
            pos = off + ln
        if pos < size:
            out.parts.append(Hole(size - pos))
        if content is not None:
            out.content_hash = content.digest()
        return out

    # ------------------------------------------------------------------ delta
    def _read_delta(self, fd: int, size: int, prev_refs: list[ContentRef], prev_dig: bytes) -> PendingContent:
        out = PendingContent()
        extents = page_aligned_extents(data_extents(fd, size), size)
        n_pages = -(-size // PAGE_SIZE)
        prev_pages = len(prev_dig) // DIGEST
        new_dig = bytearray(n_pages * DIGEST)
        reader = _SlidingReader(fd, size, out)
        next_page = 0

        def digest_up_to(end: int) -> None:
            nonlocal next_page
            last = (end - 1) // PAGE_SIZE
            while next_page <= last:
                s = next_page * PAGE_SIZE
                e = min(s + PAGE_SIZE, size)
                new_dig[next_page * DIGEST:(next_page + 1) * DIGEST] = (
                    self._pages.digest(reader.get(s, e - s)) if _overlaps(extents, s, e)
                    else self._pages.zero_run(e - s))
                next_page += 1

        off = 0
        for ref in prev_refs:
            if off >= size:
                break
            r_len = min(ref.size, size - off)
            r_end = off + r_len
            digest_up_to(r_end)
            first, last = off // PAGE_SIZE, (r_end - 1) // PAGE_SIZE
            if not _overlaps(extents, off, r_end):
                out.parts.append(Hole(r_len))
            else:
                changed = [p for p in range(first, last + 1)
                           if p >= prev_pages
                           or new_dig[p * DIGEST:(p + 1) * DIGEST] != prev_dig[p * DIGEST:(p + 1) * DIGEST]]
                if not changed and r_len == ref.size and not isinstance(ref, Hole):
                    out.parts.append(ref)
                elif isinstance(ref, Hole) or r_len != ref.size:
                    out.parts.append(self._submit(self._save_full, reader.get(off, r_len)))
                else:
                    base = ref.id if isinstance(ref, Full) else ref.base
                    prior = bitmap_pages(ref.pages, first) if isinstance(ref, Patch) else set()
                    union = sorted(prior.union(changed))
                    if len(union) > MAX_PATCH_SHARE * (last - first + 1):
                        out.parts.append(self._submit(self._save_full, reader.get(off, r_len)))
                    else:
                        pieces: list[tuple[int, bytes | memoryview]] = [
                            (s, reader.get(off + s, ln)) for s, ln in coalesce(union, off, r_len, PAGE_SIZE)]
                        job = self._save_patch(base, r_len, bitmap(union, first, last - first + 1))
                        out.parts.append(self._submit(job, encode_patch(pieces)))
            off = r_end
            reader.release_before(off - off % PAGE_SIZE)
        if off < size:
            # Grown beyond the previous end: content-defined chunks, as for a new file.
            digest_up_to(size)
            tail = reader.get(off, size - off)
            mv = memoryview(tail)
            for s, ln in self.chunker.cut(tail):
                out.parts.append(self._submit(self._save_full, bytes(mv[s:s + ln])))
        else:
            digest_up_to(size)
        out.digests = bytes(new_dig)  # from the very bytes stored: consistent
        return out


def _overlaps(extents: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether [start, end) touches any of the sorted, disjoint extents."""
    i = bisect.bisect_right(extents, (end, -1)) - 1  # last extent starting before end
    return i >= 0 and extents[i][0] + extents[i][1] > start


class _SlidingReader:
    """Sequential page-aligned reads with a window that forgets what lies behind."""

    def __init__(self, fd: int, size: int, out: PendingContent) -> None:
        self.fd = fd
        self.size = size
        self.out = out
        self.start = 0
        self.buf = bytearray()

    def get(self, offset: int, length: int) -> bytes:
        end = offset + length
        if offset < self.start:
            raise AssertionError("sliding reader moved backwards")
        while self.start + len(self.buf) < end:
            pos = self.start + len(self.buf)
            n = min(WINDOW, self.size - pos)
            if n <= 0:
                raise FileChanged("file shrank while being read")
            self.buf += _read_exact(self.fd, pos, n)
            self.out.bytes_read += n
        return bytes(self.buf[offset - self.start:end - self.start])

    def release_before(self, offset: int) -> None:
        drop = offset - self.start
        if drop > WINDOW:
            del self.buf[:drop]
            self.start = offset
