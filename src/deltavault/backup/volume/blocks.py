"""One segment (64 MiB) of a volume into block references and page digests.

The segment's pages fall into three kinds: *read* (the change source named them, or they
were not captured before), *zero* (holes, free space) and *stale* (not read: unchanged
since the previous snapshot). Read and zero pages get fresh digests; comparing them with
the previous digests gives the pages that really changed. A block with no changed page
keeps its reference. Otherwise:

- it was all zeros before (or is new): it is stored whole, or as a Hole;
- else a patch of the changed pages is added to the previous block's chain (the base
  blob is never re-read);
- a chain at ``MAX_CHAIN`` patches is merged into one patch, and a block whose patches
  cover more than ``MAX_PATCH_SHARE`` of its pages becomes a new base. Both read the
  missing pages from the source; those reads are counted as ``extra_read``.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from pyroaring import BitMap

from deltavault.chunking.pages import DIGEST, PageHasher
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
from deltavault.tracking.volume import pagesets
from deltavault.tracking.volume.readers import VolumeReader
from deltavault.workers import DEFAULT_BUFFER_MEMORY, Inflight

MAX_CHAIN = 8  # patches on one base before they are merged: bounds restore reads
ZERO_CHUNK = 4 * 1024 * 1024
PIECE = 4 * 1024 * 1024  # a segment is read and stored this much at a time (or a block, if larger)


@dataclass
class SegmentPlan:
    index: int
    first_page: int
    n_pages: int
    read: BitMap  # pages of this segment to read (absolute numbers)
    zero: BitMap  # pages of this segment known to be zeros or free
    prev_refs: list[ContentRef] | None = None
    prev_digests: bytes | None = None


@dataclass
class SegmentStats:
    blocks_changed: int = 0
    pages_changed: int = 0
    pages_read: int = 0
    extra_read: int = 0  # bytes read to merge chains or rebase blocks
    stale_mismatch: int = 0  # pages read for a merge that differ from their old digest
    # Block numbers, for the snapshot's RunBlocks (reports): read from the source, changed.
    read_blocks: list[int] = field(default_factory=list)
    changed_blocks: list[int] = field(default_factory=list)


@dataclass
class SegmentResult:
    plan: SegmentPlan
    refs: list[ContentRef | Future[ContentRef]]
    digests: bytes
    stats: SegmentStats

    def resolved(self) -> list[ContentRef]:
        return [r.result() if isinstance(r, Future) else r for r in self.refs]


class _Buffers:
    """Piece buffers, reused: at most ``limit`` exist; ``take`` waits for one to come back.
    Anonymous mappings are page-aligned: O_DIRECT reads of a device land in them."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._cond = threading.Condition()

    def take(self) -> mmap.mmap:
        with self._cond:
            while not self._free and self._made >= self.limit:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._made += 1
        return mmap.mmap(-1, self.size)

    def give(self, buf: mmap.mmap) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()


class SegmentEncoder:
    """A segment is read, digested and stored a piece (``PIECE``, whole blocks) at a time,
    each into a buffer of its own that comes back once the piece's blocks are stored. So
    memory holds ``buffer_memory`` of block data, not whole 64 MiB segments: three of those
    (one being read, two with the workers) were most of a volume backup's memory
    (docs/benchmarks.md, *Memory*)."""

    def __init__(self, store: BlobSaver, reader: VolumeReader, hasher: PageHasher, *, size: int,
                 block_size: int, pool: ThreadPoolExecutor, inflight: Inflight,
                 buffer_memory: int = DEFAULT_BUFFER_MEMORY) -> None:
        self.store = store
        self.reader = reader
        self.hasher = hasher
        self.size = size
        self.bs = block_size
        self.ppb = block_size // PAGE_SIZE
        self.pool = pool
        self.inflight = inflight
        self._zero_block = bytes(block_size)
        self._zeros = memoryview(bytes(ZERO_CHUNK))
        self._zero_dig = memoryview(hasher.zero * (max(PIECE, block_size) // PAGE_SIZE))
        self.piece_pages = max(PIECE, block_size) // PAGE_SIZE
        # Two at least: one being read while the workers store the other.
        self._buffers = _Buffers(self.piece_pages * PAGE_SIZE,
                                 max(2, buffer_memory // (self.piece_pages * PAGE_SIZE)))

    def _zero(self, mv: memoryview, start: int, end: int) -> None:
        while start < end:
            n = min(end - start, ZERO_CHUNK)
            mv[start:start + n] = self._zeros[:n]
            start += n

    # ------------------------------------------------------------------ workers
    def _submit(self, fn: Callable[[memoryview], ContentRef], data: memoryview) -> Future[ContentRef]:
        n = len(data)
        self.inflight.acquire(n)
        fut = self.pool.submit(fn, data)
        fut.add_done_callback(lambda _f: self.inflight.release(n))
        return fut

    def _full(self, data: memoryview) -> ContentRef:
        bid, _ = self.store.save_blob(BlobType.DATA, data)
        return Full(bid, len(data))

    def _patch_job(self, base: bytes, chain: list[bytes], size: int, pages: bytes) -> Callable[[memoryview], ContentRef]:
        def job(patch: memoryview) -> ContentRef:
            pid, _ = self.store.save_blob(BlobType.DATA, patch, level=PATCH_LEVEL)
            return Patch(base, [*chain, pid], size, pages)
        return job

    # ------------------------------------------------------------------ reading
    def _read_pages(self, mv: memoryview, base: int, pages: BitMap) -> int:
        """Read ``pages`` into ``mv``, which holds the pages from ``base`` on; returns the
        bytes read."""
        total = 0
        start = base * PAGE_SIZE
        for a, b in pagesets.runs(pages):
            off = (a - base) * PAGE_SIZE
            end = min((b - base) * PAGE_SIZE, self.size - start)
            if end > off:
                self.reader.read_into(mv[off:end], start + off)
                total += end - off
        return total

    def _digest_runs(self, dig: bytearray, first: int, mv: memoryview, base: int, pages: BitMap) -> None:
        """Digests of ``pages`` (bytes in ``mv`` from page ``base`` on) into ``dig`` (the
        segment's, from page ``first`` on)."""
        for a, b in pagesets.runs(pages):
            s, e = (a - base) * PAGE_SIZE, (b - base) * PAGE_SIZE
            dig[(a - first) * DIGEST:(b - first) * DIGEST] = self.hasher.digests(mv[s:e])

    # ------------------------------------------------------------------ the segment
    def encode(self, plan: SegmentPlan) -> SegmentResult:
        first, n = plan.first_page, plan.n_pages
        st = SegmentStats()
        st.pages_read = len(plan.read)
        prev_dig = plan.prev_digests
        dig = bytearray(prev_dig) if prev_dig is not None else bytearray(n * DIGEST)
        known = plan.read | plan.zero
        refs: list[ContentRef | Future[ContentRef]] = []
        for pf in range(first, first + n, self.piece_pages):
            pl = min(pf + self.piece_pages, first + n)
            if prev_dig is None and self._all_holes(plan, pf, pl, dig, refs, st):
                continue
            buf = self._buffers.take()
            try:
                futures = self._piece(plan, pf, pl, memoryview(buf)[:(pl - pf) * PAGE_SIZE], dig, known,
                                      refs, st)
            except BaseException:
                self._buffers.give(buf)
                raise
            self._give_back_after(buf, futures)
        return SegmentResult(plan, refs, bytes(dig), st)

    def _all_holes(self, plan: SegmentPlan, pf: int, pl: int, dig: bytearray,
                   refs: list[ContentRef | Future[ContentRef]], st: SegmentStats) -> bool:
        """A piece of a first backup that is zeros whole (holes, free space) and ends on a block
        boundary: Holes and zero digests with no buffer, no read and no comparison; the
        same refs and counts as the general path gives it. Whether it was."""
        n = pl - pf
        if plan.zero.range_cardinality(pf, pl) != n or (pl * PAGE_SIZE < self.size and n % self.ppb):
            return False
        d0 = (pf - plan.first_page) * DIGEST
        dig[d0:d0 + n * DIGEST] = self._zero_dig[:n * DIGEST]
        for bp0 in range(pf, pl, self.ppb):
            blen = min(self.bs, self.size - bp0 * PAGE_SIZE)
            refs.append(Hole(blen))
            st.changed_blocks.append(bp0 // self.ppb)
            st.pages_changed += pagesets.pages_of(blen)
            st.blocks_changed += 1
        return True

    def _give_back_after(self, buf: mmap.mmap, futures: list[Future[ContentRef]]) -> None:
        """Return ``buf`` once the blocks stored from it are (their futures done)."""
        if not futures:
            self._buffers.give(buf)
            return
        left = [len(futures)]
        lock = threading.Lock()

        def done(_f: Future[ContentRef]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._buffers.give(buf)
        for f in futures:
            f.add_done_callback(done)

    def _piece(self, plan: SegmentPlan, pf: int, pl: int, mv: memoryview, dig: bytearray, known: BitMap,
               refs: list[ContentRef | Future[ContentRef]], st: SegmentStats) -> list[Future[ContentRef]]:
        """Pages [pf, pl) of the segment (whole blocks) through ``mv``; their block references
        go to ``refs``. Returns the futures of the blocks stored from ``mv``."""
        first = plan.first_page
        prev_dig = plan.prev_digests
        zero = pagesets.clamp(plan.zero, pf, pl)
        read = pagesets.clamp(plan.read, pf, pl)
        # The buffer holds an older piece: only read pages, and zero pages once a block's
        # are filled (``fill``: only for blocks that are stored from the buffer), are valid.
        tail = self.size - pf * PAGE_SIZE
        if tail < len(mv):
            self._zero(mv, max(0, tail), len(mv))  # past the end of the volume
        self._read_pages(mv, pf, read)
        self._digest_runs(dig, first, mv, pf, read)
        for a, b in pagesets.runs(zero):
            dig[(a - first) * DIGEST:(b - first) * DIGEST] = self._zero_dig[:(b - a) * DIGEST]
        futures: list[Future[ContentRef]] = []

        def keep(ref: ContentRef | Future[ContentRef], of_buffer: bool = True) -> None:
            refs.append(ref)
            if of_buffer and isinstance(ref, Future):
                futures.append(ref)

        for bp0 in range(pf, pl, self.ppb):
            j = (bp0 - first) // self.ppb
            bstart = bp0 * PAGE_SIZE
            boff = (bp0 - pf) * PAGE_SIZE  # the block's offset in mv
            blen = min(self.bs, self.size - bstart)
            bp1 = bp0 + pagesets.pages_of(blen)
            prev = plan.prev_refs[j] if plan.prev_refs is not None else None
            block_no = bp0 // self.ppb
            n_known = known.range_cardinality(bp0, bp1)
            # Zeros whole: stored as a Hole with no fill or comparison, unless a patch needs them.
            hole = zero.range_cardinality(bp0, bp1) == bp1 - bp0
            if plan.read.range_cardinality(bp0, bp1):
                st.read_blocks.append(block_no)
            if prev_dig is None:
                changed: list[int] = []  # only counted: with no previous digests there is no patch
                n_changed = n_known
            elif (dig[(bp0 - first) * DIGEST:(bp1 - first) * DIGEST]
                  == prev_dig[(bp0 - first) * DIGEST:(bp1 - first) * DIGEST]):
                changed = []  # one comparison for the usual case: nothing in the block changed
                n_changed = 0
            else:
                changed = [p for p in pagesets.clamp(known, bp0, bp1)
                           if dig[(p - first) * DIGEST:(p - first + 1) * DIGEST]
                           != prev_dig[(p - first) * DIGEST:(p - first + 1) * DIGEST]]
                n_changed = len(changed)
            if prev is not None and not n_changed:
                keep(prev)
                continue
            st.blocks_changed += 1
            st.pages_changed += n_changed
            st.changed_blocks.append(block_no)
            if prev is None or isinstance(prev, Hole):
                # No base to patch. Unread pages of a block that was all zeros are zeros.
                if prev is None and n_known != bp1 - bp0:
                    raise AssertionError(f"block {bstart}: neither read whole nor known before")
                if hole:
                    keep(Hole(blen))
                    continue
                block_known = pagesets.clamp(known, bp0, bp1)
                for a, b in pagesets.runs(pagesets.span(bp0, bp1) - block_known):
                    self._zero(mv, (a - pf) * PAGE_SIZE, (b - pf) * PAGE_SIZE)
                self._fill(mv, pf, zero, bp0, bp1)
                keep(self._whole(mv, boff, blen))
                continue
            assert isinstance(prev, Full | Patch)
            base = prev.id if isinstance(prev, Full) else prev.base
            chain = prev.patches if isinstance(prev, Patch) else []
            prior = bitmap_pages(prev.pages, bp0) if isinstance(prev, Patch) else set()
            union = prior.union(changed)
            block_known = pagesets.clamp(known, bp0, bp1)
            if len(union) > MAX_PATCH_SHARE * (bp1 - bp0):
                if hole:  # known whole, so nothing to fetch
                    keep(Hole(blen))
                    continue
                self._fill(mv, pf, zero, bp0, bp1)
                if self._fetch(mv, pf, first, pagesets.span(bp0, bp1) - block_known, dig, prev_dig, st):
                    self._read_block(st, block_no)
                keep(self._whole(mv, boff, blen))
                continue
            if len(chain) >= MAX_CHAIN:
                if self._fetch(mv, pf, first, BitMap(prior) - block_known, dig, prev_dig, st):
                    self._read_block(st, block_no)
                chain, patched = [], sorted(union)
            else:
                patched = changed
            self._fill(mv, pf, zero, bp0, bp1)  # changed pages may be data that became zeros
            pieces: list[tuple[int, bytes | memoryview]] = [
                (s, mv[boff + s:boff + s + ln]) for s, ln in coalesce(patched, bstart, blen, PAGE_SIZE)]
            job = self._patch_job(base, chain, blen, bitmap(sorted(union), bp0, bp1 - bp0))
            # The patch is a copy (encode_patch): it does not hold the buffer.
            keep(self._submit(job, memoryview(encode_patch(pieces))), of_buffer=False)
        return futures

    def _fill(self, mv: memoryview, base: int, zero: BitMap, bp0: int, bp1: int) -> None:
        """Zeros into the block's zero pages in ``mv`` (pages from ``base`` on)."""
        for a, b in pagesets.runs(zero, bp0, bp1):
            self._zero(mv, (a - base) * PAGE_SIZE, (b - base) * PAGE_SIZE)

    def _whole(self, mv: memoryview, off: int, blen: int) -> ContentRef | Future[ContentRef]:
        data = mv[off:off + blen]
        if self._zero_block.startswith(data):  # a memcmp; memoryview == compares item by item
            return Hole(blen)
        return self._submit(self._full, data)

    @staticmethod
    def _read_block(st: SegmentStats, block_no: int) -> None:
        if not st.read_blocks or st.read_blocks[-1] != block_no:
            st.read_blocks.append(block_no)

    def _fetch(self, mv: memoryview, base: int, first: int, pages: BitMap, dig: bytearray,
               prev_dig: bytes | None, st: SegmentStats) -> bool:
        """Read pages the change source called unchanged (to merge or rebase a block) into
        ``mv`` (pages from ``base`` on). Their digests must match the old ones; a mismatch
        is counted (the new bytes are stored). Whether anything was read."""
        if not pages:
            return False
        st.extra_read += self._read_pages(mv, base, pages)
        self._digest_runs(dig, first, mv, base, pages)
        if prev_dig is not None:
            st.stale_mismatch += sum(
                1 for p in pages if dig[(p - first) * DIGEST:(p - first + 1) * DIGEST]
                != prev_dig[(p - first) * DIGEST:(p - first + 1) * DIGEST])
        return True
