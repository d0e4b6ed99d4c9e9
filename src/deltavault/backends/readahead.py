"""Read-ahead for object stores: many small ranged reads of one pack become a few large GETs.

A restore reads a pack's blobs a few hundred KiB at a time, in roughly increasing order
(trees and small files interleave, so not strictly); on S3 each read is a request with its
own latency and cost. Once a pack is being read piecewise (a second read of it, or a first
read near its start, where a scan begins), its reads are served from kept pieces of it, each
fetched in one GET and kept, least recently used first out, while they hold at most ``keep``
bytes. A read that no kept piece holds brings the whole part of the pack not fetched yet
around it (up to ``block`` bytes, more than a default pack: 32 MiB and its last blob), cut
short by the store at the pack's end: memory is what was received. No byte of a pack is
fetched twice: the ranges fetched are remembered (``Claims``, for the last 4,096 packs), and
a read of bytes fetched before and dropped since passes through as a ranged read of just
those bytes. Other reads (a pack header, one blob, reads of two blocks or more, whole
objects) pass through unchanged. Packs never change; a put or delete of a name drops what
is kept and remembered of it.

``prefetch`` is a reader's hint that it will read a range soon: the pack from there on (to
the next range fetched before) is fetched on a background thread, at most ``PREFETCHING`` at
once, so a GET overlaps the work on the bytes before it (a restore's large files,
restore/content.py). From the hinted offset, not the pack's start: a pack whose first reader
wants its end (a large file's first segment) and whose head is read much later (the small
files backed up before it) came whole twice.

Memory: one budget, ``keep`` bytes, covers the kept pieces and every GET in flight, reads'
and prefetches alike. A GET reserves its response's length before the body is read
(``get_sized``: on S3 the length is in the headers), evicting kept pieces, least recently
used first, or waiting for GETs in flight to finish; a waiting GET holds no reservation, so
one always proceeds (alone, a response larger than the whole budget is let through). A
prefetch starts only if its hinted range fits then, and is skipped otherwise. Before this, 128
MiB were kept and GETs in flight (2 prefetches and one per reading thread) came on top: an
S3 restore peaked at 430-590 MB RSS against 150 MB from a local repository (issue #17).
``view`` hands out a read-only slice of a kept piece without copying it.

``hold`` is a hint that also pins: the pack's pieces are not dropped until the returned
release is called (its reader is done). A restore reads a large file's segments and
batches of small files at once, and their hinted packs outnumbered the budget: least
recently used first, a pack fetched ahead was dropped before its reads came and fetched
again (646 MB received for 498 MB of packs, issue #17). Pinned bytes are bounded by
back-pressure instead: a ``hold(wait=True)`` waits while the packs held would pass the
budget, for the fixed holds (``wait=False``) to be released; fixed holds must be released
whatever waiting issuers do (a large file's writer holds the segments it has yet to
submit, so it does not wait; what it holds is bounded by its window). A GET waits for
room while pinned pieces fill the budget, until no other GET is in flight. Of the pieces
not held, those served many reads (a tree pack, read a directory at a time) go last.
"""

from __future__ import annotations

import mmap
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from deltavault.backends.base import Backend, Forwarding, get_sized, put_file
from deltavault.backends.claims import Claims

Block = bytes | mmap.mmap


class ReadAheadBackend(Forwarding):
    HEAD = 1024 * 1024  # a first read this close to the start of a pack begins a scan
    LARGE = 1024 * 1024  # and so does a first read this large
    PREFETCHING = 2  # background fetches at once (each a pack: what is kept is bounded by keep)
    OFTEN = 64  # a kept piece served this many reads is dropped after the others (_evict)

    # 16 MiB blocks took two or three GETs per 32 MiB pack: a restore made 57 GETs where
    # restic made 48 (issue #17). A whole pack per GET: 4 packs of 32 MiB, kept or in flight.
    def __init__(self, inner: Backend, *, block: int = 64 * 1024 * 1024, keep: int = 128 * 1024 * 1024,
                 prefix: str = "data/") -> None:
        super().__init__(inner)
        self.block = block
        self.keep = keep  # the budget: bytes kept and bytes of GETs in flight, together
        self.prefix = prefix
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when GETs in flight end
        self._kept = 0  # bytes in _cache
        self._flight = 0  # bytes reserved by GETs in flight
        self.peak = 0  # most of _kept + _flight at any time (what tests hold to the budget)
        # (name, first byte) -> a piece of the pack fetched in one GET: an S3 response's
        # mapping (backends/s3.py get_sized). A pack's pieces never overlap.
        self._cache: OrderedDict[tuple[str, int], Block] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()  # packs read before (bounded)
        # pack -> the ranges fetched before or being fetched (bounded): none is fetched twice
        self._claims: OrderedDict[str, Claims] = OrderedDict()
        self._inflight: dict[str, list[tuple[int, int, threading.Event]]] = {}  # pack -> its GETs under way
        self._ahead = 0  # prefetches queued or running
        # pack -> (holds not released, its bytes as estimated by its holds, how many of the
        # holds are fixed, not waiting): never dropped
        self._holds: dict[str, tuple[int, int, int]] = {}
        self._held = 0  # sum of the held packs' estimates
        self._held_from: dict[str, int] = {}  # held pack -> the lowest offset its holders read
        self._fixed = 0  # fixed holds not released
        self._hits: dict[tuple[str, int], int] = {}  # kept piece -> reads served from it
        self._pool: ThreadPoolExecutor | None = None

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        got = self._range(name, offset, length)
        if got is None or length is None:
            return self.inner.get(name, offset, length)
        return _join(got, offset, length)

    def view(self, name: str, offset: int, length: int) -> memoryview:
        """``get`` without copying a range inside one kept piece: a read-only view of it,
        which keeps that piece alive while held (a restore's reads of many neighbouring
        small blobs, up to a pack at once, were a copy of the pack each)."""
        got = self._range(name, offset, length)
        if got is None:
            return memoryview(self.inner.get(name, offset, length))
        if len(got) > 1:
            return memoryview(_join(got, offset, length))
        start, piece = got[0]
        return memoryview(piece).toreadonly()[offset - start:offset - start + length]  # a mapping is writable

    def _range(self, name: str, offset: int, length: int | None) -> list[tuple[int, Block]] | None:
        """The kept pieces holding the range, in order, fetched if missing; None for a read
        that passes through (a lone read, a range read before and dropped since)."""
        b = self.block
        if length is None or offset < 0 or length >= 2 * b or length == 0 or not name.startswith(self.prefix):
            return None
        end = offset + length
        with self._lock:
            # A large read is a segment of a large file (restore/content.py): the other
            # segments, read by other threads meanwhile, are in the same pack. Passed
            # through, its bytes were fetched again with the pack (S3 restore: 65 GETs and
            # 531 MB for 498 MB of packs; 57 and 498 MB this way).
            scanning = name in self._seen or offset < self.HEAD or length >= self.LARGE
            self._see(name)
        if not scanning:
            return None
        while True:
            with self._lock:
                got = self._cover(name, offset, end)
                if got is not None:
                    return got
                # Threads wanting bytes being fetched wait for that fetch; other ranges of
                # the pack are fetched meanwhile (a restore's parallel segments read one
                # pack at once).
                waits = [ev for lo, hi, ev in self._inflight.get(name, ()) if lo < end and offset < hi]
                if not waits:
                    claims = self._claims.get(name)
                    free = offset if claims is None else claims.first_free(offset, end)
                    if free is None:
                        # Fetched once and dropped since: what a restore still reads of it is
                        # a late reader's few blobs, not worth the pack again.
                        return None
                    # Unhinted reads (a tree pack, read a directory at a time, bottom-up as
                    # it was written) bring the whole gap they fall in, in one GET.
                    lo = 0 if claims is None else claims.end_below(free)
                    if end - lo > b:
                        lo = free
                    nxt = None if claims is None else claims.start_above(free)
                    hi = lo + max(b, end - lo) if nxt is None else min(nxt, lo + max(b, end - lo))
                    ev = self._claim(name, lo, hi)
            if waits:
                for w in waits:
                    w.wait()
                continue
            self._fetch(name, lo, hi, ev)

    def _see(self, name: str) -> None:
        self._seen[name] = None
        self._seen.move_to_end(name)
        if len(self._seen) > 4096:
            self._seen.popitem(last=False)

    def _cover(self, name: str, offset: int, end: int) -> list[tuple[int, Block]] | None:
        """The kept pieces of ``name`` that hold ``[offset, end)`` together, or None (lock held).
        Few pieces are kept (the budget is a few packs), so they are scanned."""
        claims = self._claims.get(name)
        if claims is not None and claims.size is not None:
            end = min(end, max(offset + 1, claims.size))  # a read past the end gets what there is
        out: list[tuple[int, Block]] = []
        at = offset
        for start, piece in sorted((k[1], v) for k, v in self._cache.items() if k[0] == name):
            if start <= at < start + len(piece):
                out.append((start, piece))
                at = start + len(piece)
                if at >= end:
                    break
        if at < end:
            return None
        for start, _piece in out:
            key = (name, start)
            self._cache.move_to_end(key)
            self._hits[key] = self._hits.get(key, 0) + 1
        return out

    def _claim(self, name: str, lo: int, hi: int) -> threading.Event:
        """Mark ``[lo, hi)`` of ``name`` as being fetched (lock held); the event is set when
        the fetch ends, either way."""
        claims = self._claims.get(name)
        if claims is None:
            claims = self._claims[name] = Claims()
            if len(self._claims) > 4096:  # bounded: the oldest pack without a fetch under way goes
                old = next((n for n in self._claims if n not in self._inflight and n != name), None)
                if old is not None:
                    del self._claims[old]
        claims.add(lo, hi)
        ev = threading.Event()
        self._inflight.setdefault(name, []).append((lo, hi, ev))
        return ev

    def _settle(self, name: str, lo: int, hi: int, ev: threading.Event, *, failed: bool) -> None:
        """A fetch's end (lock held): its waiters go on; a failed one's range is free again."""
        flights = [f for f in self._inflight.get(name, []) if f[2] is not ev]
        if flights:
            self._inflight[name] = flights
        else:
            self._inflight.pop(name, None)
        if failed and name in self._claims:
            self._claims[name].remove(lo, hi)
        ev.set()

    def prefetch(self, name: str, offset: int, length: int) -> None:
        """Start fetching ``length`` bytes at ``offset``, from there on to the next range
        fetched before (or a block), unless they are kept or being fetched or were fetched
        before, ``PREFETCHING`` fetches are under way, or GETs in flight leave no room in the
        budget for ``length`` bytes (a hint, not a queue: a read that comes first fetches
        them itself, and the prefetch then finds them claimed)."""
        b = self.block
        if length <= 0 or offset < 0 or length >= 2 * b or not name.startswith(self.prefix):
            return
        end = offset + length
        with self._lock:
            # Its reads are a scan, served from the pack even when no fetch starts here: a
            # first small read mid-pack had passed through, and the pack came again later.
            self._see(name)
            # From the first byte any holder of the pack will read: a large file's segment
            # with a few blobs at a pack's start holds it without fetching ahead, and the
            # next segment's hint, from mid-pack, left the head to a GET of its own.
            offset = min(offset, self._held_from.get(name, offset))
            claims = self._claims.get(name)
            free = offset if claims is None else claims.first_free(offset, end)
            # A hint that comes after its bytes were fetched (and maybe dropped) is late:
            # fetching them again cost a 21 MB pack twice in the S3 restore.
            if free is None or self._ahead >= self.PREFETCHING or self._flight + length > self.keep:
                return
            # From where the hinted reads begin: a pack whose first reader wants its end (a
            # large file's first segment) and whose head is read much later (small files
            # written before it) came whole twice, 34 MB of an S3 restore's 498 (issue #17).
            lo = free if claims is not None or offset >= self.HEAD else 0
            nxt = None if claims is None else claims.start_above(lo)
            hi = lo + b if nxt is None else min(nxt, lo + b)
            ev = self._claim(name, lo, hi)
            self._ahead += 1
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.PREFETCHING, thread_name_prefix="dv-readahead")
            pool = self._pool
        try:
            pool.submit(self._prefetch, name, lo, hi, length, ev)
        except BaseException:
            with self._lock:
                self._ahead -= 1
                self._settle(name, lo, hi, ev, failed=True)
            raise

    def hold(self, name: str, offset: int, length: int, *, wait: bool = False,
             ahead: bool = True) -> Callable[[], None]:
        """``prefetch`` (unless not ``ahead``), and the pack's pieces are kept until the
        returned function is called (once its reads are done; a second call does nothing).
        ``wait``: first wait while the packs held, with this one, would pass the budget and
        a fixed (not waiting) hold is held."""
        if length <= 0 or offset < 0 or not name.startswith(self.prefix):
            return lambda: None
        fixed = 0 if wait else 1
        with self._room:
            n, est, nfixed = self._holds.get(name, (0, 0, 0))
            # A fetch may bring the pack from its start; a hold not fetching ahead counts for
            # nothing here (its pack, if kept, is counted by the GETs' wait, _pinned).
            grow = max(0, offset + length - est) if ahead else 0
            # Only holds that are released whatever waiting issuers do (fixed ones) are waited
            # for: a waiting issuer's own holds, or another's, may wait on it.
            while wait and self._fixed and self._held + grow > self.keep:
                self._room.wait()
                n, est, nfixed = self._holds.get(name, (0, 0, 0))
                grow = max(0, offset + length - est) if ahead else 0
            self._holds[name] = (n + 1, est + grow, nfixed + fixed)
            self._held_from[name] = min(offset, self._held_from.get(name, offset))
            self._held += grow
            self._fixed += fixed
        if ahead:
            self.prefetch(name, offset, length)
        done = [False]

        def release() -> None:
            with self._room:
                if done[0]:
                    return
                done[0] = True
                n, est, nfixed = self._holds.pop(name)
                self._fixed -= fixed
                if n > 1:
                    self._holds[name] = (n - 1, est, nfixed - fixed)
                else:
                    self._held -= est
                    self._held_from.pop(name, None)
                self._room.notify_all()
        return release

    def _prefetch(self, name: str, lo: int, hi: int, length: int, ev: threading.Event) -> None:
        try:
            with self._lock:
                if self._flight + length > self.keep:  # reads took the room meanwhile: they come first
                    self._settle(name, lo, hi, ev, failed=True)
                    return
            self._fetch(name, lo, hi, ev)
        except Exception:
            pass  # only a hint: the read that needs these bytes fetches them and reports the error
        finally:
            with self._lock:
                self._ahead -= 1

    def _fetch(self, name: str, lo: int, hi: int, ev: threading.Event) -> None:
        """GET ``[lo, hi)`` of ``name`` (claimed by ``ev``) and keep it; the store cuts a
        range past the object's end short."""
        held = [0]  # bytes this GET has reserved
        try:
            data = get_sized(self.inner, name, lo, hi - lo, lambda n: self._reserve(n, held))
        except BaseException:
            self._reserve(0, held)
            with self._lock:
                self._settle(name, lo, hi, ev, failed=True)
            raise
        with self._lock:
            key = (name, lo)
            self._kept += len(data) - len(self._cache.pop(key, b""))
            self._cache[key] = data
            if len(data) < hi - lo and name in self._claims:
                self._claims[name].size = lo + len(data)
            self._settle(name, lo, hi, ev, failed=False)
            self._flight -= held[0]  # now kept, counted in _kept
            self._evict(self.keep - self._flight)  # only if the store sent more than it said
            self._room.notify_all()

    def _reserve(self, n: int, held: list[int]) -> None:
        """Reserve ``n`` bytes of the budget for a GET's response, in place of the ``held[0]``
        it had (a retry asks again), evicting kept pieces, least recently used first, or
        waiting for other GETs in flight. A waiter holds nothing, so some GET always
        proceeds; one alone may take more than the budget (a larger response than that)."""
        with self._room:
            self._flight -= held[0]
            held[0] = 0
            self._room.notify_all()
            # Pinned pieces cannot make room: wait for GETs in flight to end instead.
            while self._flight and self._flight + n + self._pinned() > self.keep:
                self._room.wait()
            self._evict(self.keep - self._flight - n)
            self._flight += n
            held[0] = n
            self.peak = max(self.peak, self._kept + self._flight)

    def _evict(self, limit: int) -> None:
        """Drop the least recently used pieces of packs not held until at most ``limit``
        bytes are kept, or only held ones are left (lock held)."""
        if self._kept <= limit:
            return
        free = [k for k in self._cache if k[0] not in self._holds]
        # Blocks read many times in small pieces go last: a tree pack, read a directory at
        # a time by the walker, unheld, was dropped for data packs and fetched 4 times.
        for key in sorted(free, key=lambda k: self._hits.get(k, 0) >= self.OFTEN):
            self._kept -= len(self._cache.pop(key))
            self._hits.pop(key, None)
            if self._kept <= limit:
                return

    def _pinned(self) -> int:
        """Bytes of kept pieces of held packs (lock held)."""
        return sum(len(v) for k, v in self._cache.items() if k[0] in self._holds) if self._holds else 0

    def _forget(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == name]:
                self._kept -= len(self._cache.pop(key))
                self._hits.pop(key, None)
            self._seen.pop(name, None)
            self._claims.pop(name, None)

    def put(self, name: str, data: bytes) -> None:
        self._forget(name)
        self.inner.put(name, data)

    def put_file(self, name: str, fd: int, size: int) -> None:
        self._forget(name)
        put_file(self.inner, name, fd, size)

    def delete(self, name: str) -> None:
        self._forget(name)
        self.inner.delete(name)


def _join(got: list[tuple[int, Block]], offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` from the pieces holding them."""
    if len(got) == 1:  # the usual case: one copy, not a join and then a slice of it
        start, piece = got[0]
        return piece[offset - start:offset - start + length]
    joined = b"".join(piece[max(0, offset - start):offset + length - start] for start, piece in got)
    return joined
