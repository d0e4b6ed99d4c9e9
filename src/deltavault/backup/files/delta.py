"""The delta path of a large file whose previous version has page digests (a database, a VM
image changed in place): the previous chunk boundaries are kept, and each chunk whose pages
changed is stored as a patch of those pages against its base blob (or whole, past
``MAX_PATCH_SHARE``). Data where the previous version had a hole, growth past its end and
a last chunk whose size changed are streamed through FastCDC like new data.

Memory stays bounded: the bytes of one window plus one chunk (``Scan``), and the previous
version's digests one or two META segments at a time (``PrevDigests``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from deltavault.backup.files.fileio import WINDOW, read_exact, window_for
from deltavault.backup.files.pagedigests import SegmentSink
from deltavault.backup.files.pending import PendingContent
from deltavault.chunking.pages import DIGEST, PAGES_PER_DIGEST_BLOB, DigestSegments, PageHasher
from deltavault.fs.sparse import ReadExtents, is_sparse
from deltavault.model.content import PAGE_SIZE, ContentRef, Full, Hole, Patch
from deltavault.objects.patch import MAX_PATCH_SHARE, bitmap, bitmap_pages, coalesce, encode_patch


class Chunks(Protocol):
    """What the delta path needs of the content reader: storing chunks and patches on the
    workers, and cutting new data with FastCDC."""

    def submit(self, fn: Callable[[Any], ContentRef], data: bytes | memoryview) -> Future[ContentRef]: ...

    def save_full(self, data: bytes | memoryview) -> ContentRef: ...

    def patch_job(self, base: bytes, size: int, bm: bytes) -> Callable[[bytes], ContentRef]: ...

    def stream(self, read: Callable[[int, int], bytes | memoryview], start: int, end: int,
               out: PendingContent, seen: Callable[[int, memoryview], None] | None = None,
               consumed: Callable[[int], None] | None = None) -> None: ...


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


class DeltaRead:
    """One large file read as a delta against ``PrevContent``."""

    def __init__(self, chunks: Chunks, hasher: PageHasher, save_pages: SegmentSink, max_size: int) -> None:
        self.chunks = chunks
        self.hasher = hasher
        self.save_pages = save_pages
        self.max_size = max_size

    def run(self, fd: int, st: os.stat_result, prev: PrevContent) -> PendingContent:
        size = st.st_size
        out = PendingContent()
        ids: list[bytes] = []
        segments = DigestSegments(self.hasher, lambda d: ids.append(self.save_pages(d)))
        extents = ReadExtents(fd, size, is_sparse(st))
        max_size = self.max_size
        scan = Scan(fd, size, extents, self.hasher, segments, out, keep_pages=max_size // PAGE_SIZE + 4)
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

    def _delta_chunk(self, scan: Scan, old: PrevDigests, ref: Full | Patch, off: int, r_end: int,
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
            out.parts.append(self.chunks.submit(self.chunks.save_full, scan.get(off, r_end)))
            return
        pieces: list[tuple[int, bytes | memoryview]] = [
            (s, scan.get(off + s, off + s + ln)) for s, ln in coalesce(union, off, r_len, PAGE_SIZE)]
        job = self.chunks.patch_job(base, r_len, bitmap(union, first, last - first + 1))
        out.parts.append(self.chunks.submit(job, encode_patch(pieces)))

    def _stream_region(self, scan: Scan, extents: ReadExtents, start: int, end: int,
                       out: PendingContent) -> None:
        """[start, end) as new content: holes stay holes, data is cut by FastCDC."""
        pos = start
        for off, ln in extents.ranges(start, end):
            if off > pos:
                scan.digest_to(off)
                scan.release(off)
                out.parts.append(Hole(off - pos))
            self.chunks.stream(lambda p, n: scan.get(p, p + n), off, off + ln, out,
                         seen=lambda p, mv: scan.digest_to(p + len(mv)), consumed=scan.release)
            pos = off + ln
        if pos < end:
            scan.digest_to(end)
            out.parts.append(Hole(end - pos))


class Scan:
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
        # The most a caller needs at once: a chunk (keep_pages) or a window (the streaming
        # chunker's, content.py), plus read-ahead.
        self.max_span = 2 * max(WINDOW, window_for(keep_pages * PAGE_SIZE)) + keep_pages * PAGE_SIZE

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
            data = read_exact(self.fd, read_from, hi - read_from)
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
