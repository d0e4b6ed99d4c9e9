"""Turning an open file into content references.

Three paths:
- small files: one read, FastCDC, chunks to the worker pool;
- big files: streamed in page-aligned windows through FastCDC; holes of sparse files
  become Hole references; files over the delta threshold also get per-page digests;
- large files whose previous version has page digests (a database, a VM image changed
  in place): the previous chunk boundaries are kept and each changed chunk is stored as
  a patch of its changed 4 KiB pages against its base blob. Data where the previous
  version had a hole, growth past its end and a last chunk whose size changed are
  streamed through FastCDC like new data.

Memory is bounded by construction, whatever a file's size or sparseness: bytes are held
one read window (plus one chunk) at a time, page digests one META segment (64 MiB of file)
at a time (saved as each completes), the previous version's digests one or two segments
at a time, and a run of holes is never read or digested page by page. No stored blob is
larger than the chunker's maximum, except a patch, which is bounded by its base.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import blake3

from deltavault.backup.files.pagedigests import Answer, PageDigester, SegmentSink
from deltavault.chunking.cdc import Chunker
from deltavault.chunking.pages import DIGEST, PAGES_PER_DIGEST_BLOB, DigestSegments, PageHasher
from deltavault.fs.sparse import ReadExtents, is_sparse
from deltavault.model.content import PAGE_SIZE, ContentRef, Full, Hole, Patch
from deltavault.model.types import BlobType
from deltavault.objects.patch import (
    MAX_PATCH_SHARE,
    PATCH_LEVEL,
    bitmap,
    bitmap_pages,
    coalesce,
    encode_patch,
)
from deltavault.objects.store import BlobSaver
from deltavault.workers import Inflight

WINDOW = 8 * 1024 * 1024
BATCH_BYTES = 4 * 1024 * 1024
BATCH_ITEMS = 128

__all__ = ["PAGES_PER_DIGEST_BLOB", "ContentReader", "FileChanged", "PendingContent", "PrevContent"]


class FileChanged(Exception):
    """The file changed size while being read; the caller retries."""


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
    # Ids of the page-digest META segments: saved here (delta path) or by the helper process,
    # which also returns its content hash of the file; kept only if it equals
    # ``content_hash`` of our own read.
    pages: list[bytes] | Future[Answer | None] | None = None
    content_hash: bytes | None = None
    bytes_read: int = 0
    _settled: int = 0  # parts before this index are plain references

    def compact(self) -> None:
        """Replace the finished parts by their references: a 100 GiB file has hundreds of
        thousands of chunks, and a Future weighs about ten times its reference."""
        parts = self.parts
        i = self._settled
        while i < len(parts):
            p = parts[i]
            if isinstance(p, Future):
                if not p.done() or p.exception() is not None:
                    break
                parts[i] = p.result()
            elif isinstance(p, Slot):
                if not p.done() or p.batch.error is not None:
                    break
                parts[i] = p.result()
            i += 1
        self._settled = i

    def refs(self) -> list[ContentRef]:
        return [p.result() if isinstance(p, (Future, Slot)) else p for p in self.parts]

    def page_ids(self) -> list[bytes] | None:
        """The page-digest segment ids, or None when there are none (or the helper could
        not vouch for them): the file is then stored whole by its next change."""
        d = self.pages
        if not isinstance(d, Future):
            return d
        try:
            res = d.result()
        except Exception:  # a dead helper process only costs digests
            return None
        if res is None or res[1] != self.content_hash:
            return None  # the helper read other bytes than we stored
        return res[0]


@dataclass
class PrevContent:
    """What the delta path needs of a file's previous version."""

    refs: list[ContentRef]
    pages: list[bytes]  # its page-digest segment ids
    size: int
    load: Callable[[bytes], bytes | None]  # a META blob by id, None if it cannot be had
    blob_id: Callable[[bytes], bytes] | None = None  # to check what ``load`` returns


class PrevDigests:
    """The previous version's page digests, loaded one segment at a time (at most two
    held: a chunk can straddle a segment boundary). A segment that cannot be loaded, has
    the wrong size or does not match its id leaves its pages unknown: they count as
    changed, which costs storage, never correctness."""

    def __init__(self, prev: PrevContent) -> None:
        self.prev = prev
        self.n_pages = -(-prev.size // PAGE_SIZE)
        self._held: dict[int, bytes | None] = {}

    def _segment(self, k: int) -> bytes | None:
        if k in self._held:
            return self._held[k]
        data = None
        if k < len(self.prev.pages):
            bid = self.prev.pages[k]
            data = self.prev.load(bid)
            want = min(PAGES_PER_DIGEST_BLOB, self.n_pages - k * PAGES_PER_DIGEST_BLOB) * DIGEST
            if data is not None and (len(data) != want or (
                    self.prev.blob_id is not None and self.prev.blob_id(data) != bid)):
                data = None
        if len(self._held) >= 2:
            del self._held[min(self._held)]
        self._held[k] = data
        return data

    def changed(self, first: int, new: bytes) -> list[int]:
        """The pages from ``first`` on whose digest in ``new`` differs from the previous one."""
        end = first + len(new) // DIGEST
        out: list[int] = []
        p = first
        while p < end:
            k = p // PAGES_PER_DIGEST_BLOB
            seg_first = k * PAGES_PER_DIGEST_BLOB
            seg_end = min(seg_first + PAGES_PER_DIGEST_BLOB, end)
            seg = self._segment(k) if p < self.n_pages else None
            known = min(seg_end, seg_first + len(seg) // DIGEST) if seg is not None else p
            if known > p:
                assert seg is not None
                old = seg[(p - seg_first) * DIGEST:(known - seg_first) * DIGEST]
                cur = new[(p - first) * DIGEST:(known - first) * DIGEST]
                if old != cur:
                    out.extend(q for i, q in enumerate(range(p, known))
                               if old[i * DIGEST:(i + 1) * DIGEST] != cur[i * DIGEST:(i + 1) * DIGEST])
            out.extend(range(known, seg_end))
            p = seg_end
        return out


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
        self._batch = _Batch()
        self._batch_bytes = 0

    # ------------------------------------------------------------------ helpers
    def _save_segment(self, data: bytes | None) -> bytes:
        bid, _ = self.repo.save_blob(BlobType.META, self.zero_segment if data is None else data, compress=False)
        return bid

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
    def read(self, fd: int, st: os.stat_result, prev: PrevContent | None) -> PendingContent:
        """The content of the open file ``fd`` (``st``: its fstat before the read). With
        ``prev``, a large file is read as a delta against it."""
        size = st.st_size
        if size == 0:
            return PendingContent()
        large = size >= self.delta_threshold
        if large and prev is not None and prev.refs:
            return self._read_delta(fd, st, prev)
        sparse = is_sparse(st)
        if not large and not sparse and size <= self.chunker.params.max_size:
            data = _read_exact(fd, 0, size)
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
    def _stream(self, read: Callable[[int, int], bytes | memoryview], start: int, end: int,
                out: PendingContent, seen: Callable[[int, memoryview], None] | None = None,
                consumed: Callable[[int], None] | None = None) -> None:
        """Chunk [start, end) without copying: chunks are views of the read window. The
        unfinished chunk at a window's end is read again with the next window, so the
        boundaries are those of one cut of the whole range. ``seen(offset, view)`` gets each
        window as read; ``consumed(offset)`` says that nothing before it is needed again."""
        pos = start
        while pos < end:
            data = read(pos, min(WINDOW, end - pos))
            mv = memoryview(data)
            if seen is not None:
                seen(pos, mv)
            cuts = self.chunker.cut(mv)
            if pos + len(mv) < end and len(cuts) > 1:
                cuts.pop()  # it may end only because the window ended
            for off, ln in cuts:
                out.parts.append(self._submit(self._save_full, mv[off:off + ln]))
            pos += sum(ln for _, ln in cuts)
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
            return _read_exact(fd, off, n)

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
            self._stream(read, off, off + ln, out, seen if content is not None else None)
            out.bytes_read += ln
            pos = off + ln
        if pos < size:
            out.parts.append(Hole(size - pos))
        if content is not None:
            out.content_hash = content.digest()
        return out

    # ------------------------------------------------------------------ delta
    def _read_delta(self, fd: int, st: os.stat_result, prev: PrevContent) -> PendingContent:
        size = st.st_size
        out = PendingContent()
        ids: list[bytes] = []
        segments = DigestSegments(self._pages, lambda d: ids.append(self.save_pages(d)))
        extents = ReadExtents(fd, size, is_sparse(st))
        max_size = self.chunker.params.max_size
        scan = _Scan(fd, size, extents, self._pages, segments, out, keep_pages=max_size // PAGE_SIZE + 4)
        old = PrevDigests(prev)
        off = 0
        for ref in prev.refs:
            if off >= size:
                break
            r_len = min(ref.size, size - off)
            r_end = off + r_len
            if not extents.has_data(off, r_end):
                scan.digest_to(r_end)
                out.parts.append(Hole(r_len))
            elif isinstance(ref, Hole) or r_len != ref.size or ref.size > max_size:
                # A former hole, a last chunk cut short, or a blob too large to patch (an
                # older version stored some): new data, streamed and cut like any other.
                self._stream_region(scan, extents, off, r_end, out)
            else:
                self._delta_chunk(scan, old, ref, off, r_end, out)
            off = r_end
            scan.release(off)
            out.compact()
        if off < size:  # grown past the previous end
            self._stream_region(scan, extents, off, size, out)
        scan.digest_to(size)
        segments.finish()
        out.pages = ids  # from the very bytes stored: consistent
        return out

    def _delta_chunk(self, scan: _Scan, old: PrevDigests, ref: Full | Patch, off: int, r_end: int,
                     out: PendingContent) -> None:
        """A previous chunk with data now: reused, patched or stored whole."""
        scan.digest_to(r_end)
        first, last = off // PAGE_SIZE, (r_end - 1) // PAGE_SIZE
        changed = old.changed(first, scan.digests(first, last + 1))
        if not changed:
            out.parts.append(ref)
            return
        r_len = r_end - off
        base = ref.id if isinstance(ref, Full) else ref.base
        prior = bitmap_pages(ref.pages, first) if isinstance(ref, Patch) else set()
        union = sorted(prior.union(changed))
        if len(union) > MAX_PATCH_SHARE * (last - first + 1):
            out.parts.append(self._submit(self._save_full, scan.get(off, r_end)))
            return
        pieces: list[tuple[int, bytes | memoryview]] = [
            (s, scan.get(off + s, off + s + ln)) for s, ln in coalesce(union, off, r_len, PAGE_SIZE)]
        job = self._save_patch(base, r_len, bitmap(union, first, last - first + 1))
        out.parts.append(self._submit(job, encode_patch(pieces)))

    def _stream_region(self, scan: _Scan, extents: ReadExtents, start: int, end: int,
                       out: PendingContent) -> None:
        """[start, end) as new content: holes stay holes, data is cut by FastCDC."""
        pos = start
        for off, ln in extents.ranges(start, end):
            if off > pos:
                scan.digest_to(off)
                scan.release(off)
                out.parts.append(Hole(off - pos))
            self._stream(lambda p, n: scan.get(p, p + n), off, off + ln, out,
                         seen=lambda p, mv: scan.digest_to(p + len(mv)), consumed=scan.release)
            pos = off + ln
        if pos < end:
            scan.digest_to(end)
            out.parts.append(Hole(end - pos))


class _Scan:
    """The delta path's sequential view of one file: the bytes of bounded ranges, and the
    digest of every page, in order, handed to ``segments`` (holes in bulk, unread).

    Bytes are kept from ``floor`` (what the caller may still ask for, raised by
    ``release``) on; a read extends the buffer forward, reading ahead to a window for
    small reads but never into a hole. Chunks stored are views of the buffer, so each
    buffer stays about a window long: the inflight limit then bounds what they pin. Digests of the last ``keep_pages`` pages stay at hand for
    ``digests`` (a chunk's worth)."""

    def __init__(self, fd: int, size: int, extents: ReadExtents, hasher: PageHasher,
                 segments: DigestSegments, out: PendingContent, *, keep_pages: int) -> None:
        self.fd = fd
        self.size = size
        self.extents = extents
        self.hasher = hasher
        self.segments = segments
        self.out = out
        self.keep_pages = keep_pages
        self.n_pages = -(-size // PAGE_SIZE)
        self.buf = b""
        self.buf_start = 0
        self.floor = 0
        self.next_page = 0  # the first page not digested yet
        self.recent = bytearray()  # digests of pages [recent_first, next_page)
        self.recent_first = 0
        # The most a caller needs at once: a chunk (keep_pages) or a window, plus read-ahead.
        self.max_span = 2 * WINDOW + keep_pages * PAGE_SIZE

    # ------------------------------------------------------------------ bytes
    def get(self, start: int, end: int) -> memoryview:
        """The file's bytes [start, end) (holes read as zeros); ``start`` >= ``floor``."""
        lo = min(self.floor, start)
        if lo < self.buf_start:
            raise AssertionError("delta scan moved backwards")
        buf_end = self.buf_start + len(self.buf)
        if end > buf_end:
            if lo < buf_end:
                kept, read_from = self.buf[lo - self.buf_start:], buf_end
            else:
                kept, read_from = b"", lo
            hi = end
            if end - read_from < WINDOW // 2:  # a chunk's worth: read ahead, but not into a hole
                found = self.extents.first_after(read_from)
                if found is not None and found[0] <= read_from:
                    hi = min(self.size, max(end, min(read_from + WINDOW, found[1])))
            if hi - lo > self.max_span:  # a caller skipped a release: never read a hole whole
                raise AssertionError(f"delta scan asked to hold {hi - lo} bytes")
            data = _read_exact(self.fd, read_from, hi - read_from)
            self.out.bytes_read += len(data)
            self.buf = kept + data if kept else data
            self.buf_start = lo
        return memoryview(self.buf)[start - self.buf_start:end - self.buf_start]

    def release(self, pos: int) -> None:
        """Nothing before ``pos`` will be asked for again."""
        self.floor = max(self.floor, pos)
        if self.floor >= self.buf_start + len(self.buf):
            self.buf, self.buf_start = b"", self.floor

    # ------------------------------------------------------------------ digests
    def digest_to(self, end: int) -> None:
        """Digest every page up to the one holding byte ``end - 1``."""
        last = min(-(-end // PAGE_SIZE), self.n_pages)
        while self.next_page < last:
            s = self.next_page * PAGE_SIZE
            found = self.extents.first_after(s)
            if found is None or found[0] >= last * PAGE_SIZE:
                self._zeros(last - self.next_page)
            elif found[0] > s:
                self._zeros(found[0] // PAGE_SIZE - self.next_page)
            else:
                e = min(found[1], last * PAGE_SIZE, self.size)
                while s < e:
                    n = min(WINDOW, e - s)
                    self._took(self.hasher.digests(self.get(s, s + n)))
                    s += n

    def digests(self, first: int, end: int) -> bytes:
        """Digests of pages [first, end), all digested and among the last ``keep_pages``."""
        assert self.recent_first <= first and end <= self.next_page
        return bytes(self.recent[(first - self.recent_first) * DIGEST:(end - self.recent_first) * DIGEST])

    def _took(self, dig: bytes) -> None:
        self.segments.add(dig)
        self.recent += dig
        self.next_page += len(dig) // DIGEST
        self._trim()

    def _zeros(self, n: int) -> None:
        """``n`` hole pages from ``next_page``: digested in bulk, never read."""
        start = self.next_page * PAGE_SIZE
        self.segments.add_zeros(min(n * PAGE_SIZE, self.size - start))
        keep = min(n, self.keep_pages)
        short = self.size % PAGE_SIZE if self.next_page + n == self.n_pages else 0
        tail = self.hasher.zero * (keep - 1) + (self.hasher.digest(bytes(short)) if short else self.hasher.zero)
        if n > keep:
            self.recent = bytearray(tail)
            self.recent_first = self.next_page + n - keep
        else:
            self.recent += tail
        self.next_page += n
        self._trim()

    def _trim(self) -> None:
        extra = len(self.recent) // DIGEST - 2 * self.keep_pages
        if extra > 0:
            drop = extra + self.keep_pages
            del self.recent[:drop * DIGEST]
            self.recent_first += drop
