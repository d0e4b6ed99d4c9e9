"""Turning an open file into content references.

Three paths:
- small files: one read, FastCDC, chunks to the worker pool;
- big files: streamed in page-aligned windows through FastCDC; holes of sparse files
  become Hole references; files over the delta threshold also get per-page digests;
- large files whose previous version has page digests (a database, a VM image changed
  in place): stored as patches of their changed 4 KiB pages (delta.py).

Memory is bounded by construction, whatever a file's size or sparseness: bytes are held
one read window (plus one chunk) at a time, page digests one META segment (64 MiB of file)
at a time (saved as each completes), the previous version's digests one or two segments
at a time, and a run of holes is never read or digested page by page. No stored blob is
larger than the chunker's maximum, except a patch, which is bounded by its base.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import blake3

from deltavault.backup.files.delta import DeltaRead, PrevContent
from deltavault.backup.files.fileio import read_exact, window_for
from deltavault.backup.files.pagedigests import PageDigester, SegmentSink
from deltavault.backup.files.pending import Batch, PendingContent, Slot
from deltavault.chunking.cdc import Chunker
from deltavault.chunking.pages import PAGES_PER_DIGEST_BLOB, PageHasher
from deltavault.fs.sparse import ReadExtents, is_sparse
from deltavault.model.content import ContentRef, Full, Hole, Patch
from deltavault.model.types import BlobType
from deltavault.objects.patch import PATCH_LEVEL
from deltavault.objects.store import BlobSaver, save_many
from deltavault.workers import Inflight

# Chunks go to the workers in batches (one task, one GIL round trip per few zstd calls
# for all of them: repository/blobs.py save_many): small files' chunks until a batch holds
# BATCH_BYTES or BATCH_ITEMS, a large file's one read window at a time. 1 MiB batches
# spread over the workers within the in-flight bound and keep zstd's batch buffers small
# (docs/benchmarks.md, File backup).
BATCH_BYTES = 1024 * 1024
BATCH_ITEMS = 128

class ContentReader:
    def __init__(self, repo: BlobSaver, pool: ThreadPoolExecutor, chunker: Chunker, *,
                 page_key: bytes | None, delta_threshold: int, inflight: Inflight,
                 digester: PageDigester | None = None, save_pages: SegmentSink | None = None) -> None:
        self.repo = repo
        self.pool = pool
        self.chunker = chunker
        self.page_key = page_key
        self.delta_threshold = delta_threshold
        self.inflight = inflight
        self.digester = digester or PageDigester(page_key)
        self._pages = PageHasher(page_key)
        # The digests of a segment of holes: the same blob for every such segment of
        # every file, so a 100 GiB hole costs one blob, stored once.
        self.zero_segment = self._pages.zero * PAGES_PER_DIGEST_BLOB
        self.save_pages: SegmentSink = save_pages or self._save_segment
        self._batch = Batch()
        self._batch_bytes = 0
        self.window = window_for(chunker.params.max_size)

    # ------------------------------------------------------------------ helpers
    def _save_segment(self, data: bytes | None) -> bytes:
        bid, _ = self.repo.save_blob(BlobType.META, self.zero_segment if data is None else data, compress=False)
        return bid

    def submit(self, fn: Callable[[Any], ContentRef], data: bytes | memoryview) -> Future[ContentRef]:
        n = len(data)
        self.inflight.acquire(n)
        fut = self.pool.submit(fn, data)
        fut.add_done_callback(lambda _f: self.inflight.release(n))
        return fut

    def small(self, data: bytes) -> PendingContent:
        """Bytes already in memory (at most one chunk), stored as content."""
        out = PendingContent(bytes_read=len(data))
        if data:
            out.parts.append(self._batched(data))
        return out

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
        self._batch, self._batch_bytes = Batch(), 0
        self._send(batch, n)

    def _send(self, batch: Batch, n: int) -> None:
        """One task for the chunks of ``batch`` (``n`` bytes), within the in-flight bound."""
        self.inflight.acquire(n)
        task = self.pool.submit(self._run_batch, batch)
        task.add_done_callback(lambda _f: self.inflight.release(n))

    def _run_batch(self, batch: Batch) -> None:
        try:
            saved = save_many(self.repo, BlobType.DATA, batch.items)
            batch.results = [Full(bid, len(data)) for (bid, _), data in zip(saved, batch.items)]
        except BaseException as exc:
            batch.error = exc
        finally:
            batch.items = []
            batch.done_event.set()

    def save_full(self, data: bytes | memoryview) -> ContentRef:
        bid, _ = self.repo.save_blob(BlobType.DATA, data)
        return Full(bid, len(data))

    def patch_job(self, base: bytes, size: int, bm: bytes) -> Callable[[bytes], ContentRef]:
        def job(patch: bytes) -> ContentRef:
            pid, _ = self.repo.save_blob(BlobType.DATA, patch, level=PATCH_LEVEL)
            return Patch(base, [pid], size, bm)
        return job

    # ------------------------------------------------------------------ entry point
    def read(self, fd: int, st: os.stat_result, prev: PrevContent | None, *,
             page_digests: bool = True) -> PendingContent:
        """The content of the open file ``fd`` (``st``: its fstat before the read). With
        ``prev``, a large file is read as a delta against it. ``page_digests`` False: no
        page digests however large (NTFS streams: nothing keeps them)."""
        size = st.st_size
        if size == 0:
            return PendingContent()
        large = page_digests and size >= self.delta_threshold
        if large and prev is not None and prev.refs:
            return DeltaRead(self, self._pages, self.save_pages, self.chunker.params.max_size).run(fd, st, prev)
        sparse = is_sparse(st)
        if not large and not sparse and size <= self.chunker.params.max_size:
            data = read_exact(fd, 0, size)
            out = PendingContent(bytes_read=size)
            if len(data) <= self.chunker.params.min_size:
                out.parts.append(self._batched(data))
            else:
                mv = memoryview(data)
                for off, ln in self.chunker.cut(data):
                    out.parts.append(self._batched(mv[off:off + ln]))
            return out
        extents = ReadExtents(fd, size, sparse)
        pages = self.digester.submit(fd, st, sparse, self.save_pages) if large else None
        out = self._read_stream(fd, size, extents.ranges(), blake3.blake3() if pages else None)
        out.pages = pages
        return out

    # ------------------------------------------------------------------ streaming
    def stream(self, read: Callable[[int, int], bytes | memoryview], start: int, end: int,
                out: PendingContent, seen: Callable[[int, memoryview], None] | None = None,
                consumed: Callable[[int], None] | None = None) -> None:
        """Chunk [start, end) without copying: chunks are views of the read window. The
        unfinished chunk at a window's end is read again with the next window, so the
        boundaries are those of one cut of the whole range. ``seen(offset, view)`` gets each
        window as read; ``consumed(offset)`` says that nothing before it is needed again."""
        pos = start
        while pos < end:
            data = read(pos, min(self.window, end - pos))
            mv = memoryview(data)
            if seen is not None:
                seen(pos, mv)
            cuts = self.chunker.cut(mv)
            if pos + len(mv) < end and len(cuts) > 1:
                cuts.pop()  # it may end only because the window ended
            batch = Batch()
            for i, (off, ln) in enumerate(cuts):
                batch.items.append(mv[off:off + ln])
                out.parts.append(Slot(batch, i))
            n = sum(ln for _, ln in cuts)
            self._send(batch, n)
            pos += n
            if consumed is not None:
                consumed(pos)
            out.compact()

    def _read_stream(self, fd: int, size: int, ranges: Any,
                     content: blake3.blake3 | None = None) -> PendingContent:
        """``ranges``: (offset, length) to read in order, holes between them. ``content``:
        hash (offset, then bytes) of each range, as the digest helper does."""
        out = PendingContent()
        pos = 0
        hashed = 0

        def read(off: int, n: int) -> bytes:
            return read_exact(fd, off, n)

        def seen(off: int, mv: memoryview) -> None:
            nonlocal hashed
            assert content is not None
            content.update(mv[max(0, hashed - off):])  # each byte once, in order
            hashed = off + len(mv)

        for off, ln in ranges:
            if off > pos:
                out.parts.append(Hole(off - pos))
            if content is not None:
                content.update(off.to_bytes(8, "little"))
                hashed = off
            self.stream(read, off, off + ln, out, seen if content is not None else None)
            out.bytes_read += ln
            pos = off + ln
        if pos < size:
            out.parts.append(Hole(size - pos))
        if content is not None:
            out.content_hash = content.digest()
        return out

