"""Read-ahead for object stores: many small ranged reads of one pack become a few large GETs.

A restore reads a pack's blobs a few hundred KiB at a time, in roughly increasing order
(trees and small files interleave, so not strictly); on S3 each read is a request with its
own latency and cost. Once a pack is being read piecewise (a second read of it, or a first
read near its start, where a scan begins), its reads are served from ``block``-aligned
blocks: the missing blocks a read needs are fetched in one GET, and kept, least recently
used first out, while they hold at most ``keep`` bytes. A block is larger than a default
pack (32 MiB and its last blob), so a pack being scanned comes in one GET, cut short by the
store at the pack's end: memory is what was received, not the block size. Aligned blocks
never overlap, so no byte is fetched twice while it is kept. Other reads (a pack header, one
blob, reads of two blocks or more, whole objects) pass through unchanged. Packs never
change; a put or delete of a name drops its blocks anyway.

``prefetch`` is a reader's hint that it will read a range soon: its blocks are fetched on a
background thread, at most ``PREFETCHING`` at once, so a GET overlaps the work on the bytes
before it (a restore's large files, restore/content.py).

Memory: one budget, ``keep`` bytes, covers the kept blocks and every GET in flight, reads'
and prefetches alike. A GET reserves its response's length before the body is read
(``get_sized``: on S3 the length is in the headers), evicting kept blocks, least recently
used first, or waiting for GETs in flight to finish; a waiting GET holds no reservation, so
one always proceeds (alone, a response larger than the whole budget is let through). A
prefetch starts only if its hinted range fits then, and is skipped otherwise. Before this, 128
MiB were kept and GETs in flight (2 prefetches and one per reading thread) came on top: an
S3 restore peaked at 430-590 MB RSS against 150 MB from a local repository (issue #17).
``view`` hands out a read-only slice of a kept block without copying it.

``hold`` is a hint that also pins: the pack's blocks are not dropped until the returned
release is called (its reader is done). A restore reads a large file's segments and
batches of small files at once, and their hinted packs outnumbered the budget: least
recently used first, a pack fetched ahead was dropped before its reads came and fetched
again (646 MB received for 498 MB of packs, issue #17). Pinned bytes are bounded by
back-pressure instead: a ``hold(wait=True)`` waits while the packs held would pass the
budget, for the fixed holds (``wait=False``) to be released; fixed holds must be released
whatever waiting issuers do (a large file's writer holds the segments it has yet to
submit, so it does not wait; what it holds is bounded by its window). A GET waits for
room while pinned blocks fill the budget, until no other GET is in flight. Of the blocks
not held, those served many reads go last.

``favour`` names a pack of listings (trees): a walk reads it a directory at a time over the
whole run, unheld. When held packs filled the budget it was dropped all the same, and the
walk, which every other reader waits on, stopped for its GET: an S3 restore fetched its 4.5
MB tree pack two or three times (issue #17). Up to ``SPARE`` bytes of such packs are kept
outside the budget, so memory is at most ``keep + SPARE``.
"""

from __future__ import annotations

import mmap
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

from deltavault.backends.base import Backend, Forwarding, get_sized, put_file

Block = bytes | mmap.mmap


class ReadAheadBackend(Forwarding):
    HEAD = 1024 * 1024  # a first read this close to the start of a pack begins a scan
    LARGE = 1024 * 1024  # and so does a first read this large
    PREFETCHING = 2  # background fetches at once (each a pack: what is kept is bounded by keep)
    OFTEN = 64  # a kept block served this many reads is dropped after the others (_evict)
    SPARE = 16 * 1024 * 1024  # bytes of favoured packs' blocks kept outside the budget

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
        # (name, block no) -> its bytes: an S3 response's mapping (backends/s3.py get_sized)
        self._cache: OrderedDict[tuple[str, int], Block] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()  # packs read before (bounded)
        self._fetched: OrderedDict[tuple[str, int], None] = OrderedDict()  # blocks fetched before (bounded)
        # (name, block no) -> (lock, users): a fetch holds the locks of the blocks it brings
        self._fetch_locks: dict[tuple[str, int], tuple[threading.Lock, int]] = {}
        self._ahead = 0  # prefetches queued or running
        # pack -> (holds not released, its bytes as estimated by its holds, how many of the
        # holds are fixed, not waiting): never dropped
        self._holds: dict[str, tuple[int, int, int]] = {}
        self._held = 0  # sum of the held packs' estimates
        self._fixed = 0  # fixed holds not released
        self._hits: dict[tuple[str, int], int] = {}  # kept block -> reads served from it
        self._favoured: OrderedDict[str, None] = OrderedDict()  # packs of listings (bounded)
        self._pool: ThreadPoolExecutor | None = None

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        got = self._blocks(name, offset, length)
        if got is None or length is None:
            return self.inner.get(name, offset, length)
        return self._copy(got, offset, length)

    def _copy(self, got: dict[int, Block], offset: int, length: int) -> bytes:
        b = self.block
        first, last = offset // b, (offset + length - 1) // b
        start = offset - first * b
        if first == last:  # the usual case: one copy, not a join and then a slice of it
            return got[first][start:start + length]
        joined = b"".join(got[i] for i in range(first, last + 1))
        return joined[start:start + length]

    def view(self, name: str, offset: int, length: int) -> memoryview:
        """``get`` without copying a range inside one kept block: a read-only view of it,
        which keeps that block alive while held (a restore's reads of many neighbouring
        small blobs, up to a pack at once, were a copy of the pack each)."""
        got = self._blocks(name, offset, length)
        if got is None:
            # Not through get(): _blocks has just marked the pack seen, so a second call
            # would fetch it whole for this one read (S3 restore: a 272 KB blob brought a
            # 21 MB pack, dropped before the segments that scan it came: 21 MB twice).
            return memoryview(self.inner.get(name, offset, length))
        b = self.block
        first = offset // b
        if first != (offset + length - 1) // b:
            return memoryview(self._copy(got, offset, length))
        start = offset - first * b
        return memoryview(got[first]).toreadonly()[start:start + length]  # a mapping is writable

    def _blocks(self, name: str, offset: int, length: int | None) -> dict[int, Block] | None:
        """The blocks holding the range, fetched if missing; None for a read that passes through."""
        b = self.block
        if length is None or offset < 0 or length >= 2 * b or length == 0 or not name.startswith(self.prefix):
            return None
        with self._lock:
            # A large read is a segment of a large file (restore/content.py): the other
            # segments, read by other threads meanwhile, are in the same blocks. Passed
            # through, its bytes were fetched again with their block (S3 restore: 65 GETs
            # and 531 MB for 498 MB of packs; 57 and 498 MB this way).
            scanning = name in self._seen or offset < self.HEAD or length >= self.LARGE
            self._seen[name] = None
            self._seen.move_to_end(name)
            if len(self._seen) > 4096:
                self._seen.popitem(last=False)
        if not scanning:
            return None
        first, last = offset // b, (offset + length - 1) // b
        got = self._cached(name, first, last)
        if len(got) < last - first + 1:
            # Threads wanting the same blocks wait for one fetch; other blocks of the pack
            # are fetched meanwhile (a restore's parallel segments read one pack at once).
            with self._fetching([(name, i) for i in range(first, last + 1)]):
                got = self._fetch(name, first, last)
        return got

    def prefetch(self, name: str, offset: int, length: int) -> None:
        """Start fetching the blocks of ``length`` bytes at ``offset``, unless they are kept,
        already being fetched, ``PREFETCHING`` fetches are under way, or GETs in flight
        leave no room in the budget for ``length`` bytes (a hint, not a queue: a read that
        comes first fetches them itself, and the prefetch then finds them kept)."""
        b = self.block
        if length <= 0 or offset < 0 or length >= 2 * b or not name.startswith(self.prefix):
            return
        first, last = offset // b, (offset + length - 1) // b
        with self._lock:
            # Its reads are a scan, served from the blocks even when no fetch starts here: a
            # first small read mid-pack had passed through, and the pack came again later.
            self._seen[name] = None
            self._seen.move_to_end(name)
            if self._ahead >= self.PREFETCHING or self._flight + length > self.keep or all(
                    (name, i) in self._cache or (name, i) in self._fetch_locks for i in range(first, last + 1)):
                return
            self._ahead += 1
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.PREFETCHING, thread_name_prefix="dv-readahead")
            pool = self._pool
        try:
            pool.submit(self._prefetch, name, first, last, length)
        except BaseException:
            with self._lock:
                self._ahead -= 1
            raise

    def hold(self, name: str, offset: int, length: int, *, wait: bool = False,
             ahead: bool = True) -> Callable[[], None]:
        """``prefetch`` (unless not ``ahead``), and the pack's blocks are kept until the
        returned function is called (once its reads are done; a second call does nothing).
        ``wait``: first wait while the packs held, with this one, would pass the budget and
        a fixed (not waiting) hold is held."""
        if length <= 0 or offset < 0 or not name.startswith(self.prefix):
            return lambda: None
        fixed = 0 if wait else 1
        with self._room:
            n, est, nfixed = self._holds.get(name, (0, 0, 0))
            # A block brings the pack from its start; a hold not fetching ahead counts for
            # nothing here (its pack, if kept, is counted by the GETs' wait, _pinned).
            grow = max(0, offset + length - est) if ahead else 0
            # Only holds that are released whatever waiting issuers do (fixed ones) are waited
            # for: a waiting issuer's own holds, or another's, may wait on it.
            while wait and self._fixed and self._held + grow > self.keep:
                self._room.wait()
                n, est, nfixed = self._holds.get(name, (0, 0, 0))
                grow = max(0, offset + length - est) if ahead else 0
            self._holds[name] = (n + 1, est + grow, nfixed + fixed)
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
                self._room.notify_all()
        return release

    def favour(self, name: str) -> None:
        """A hint that pack ``name`` holds listings, read a piece at a time all run long:
        its blocks are kept outside the budget while those of such packs take at most
        ``SPARE`` bytes (the most recently used first)."""
        if not name.startswith(self.prefix):
            return
        with self._lock:
            if name not in self._favoured:
                self._favoured[name] = None
                if len(self._favoured) > 4096:
                    self._favoured.popitem(last=False)

    def _prefetch(self, name: str, first: int, last: int, length: int) -> None:
        try:
            with self._fetching([(name, i) for i in range(first, last + 1)]):
                with self._lock:
                    if self._flight + length > self.keep:
                        return  # reads took the room meanwhile: they come first
                    # A hint that comes after its blocks were read (and maybe dropped) is
                    # late: fetching them again cost a 21 MB pack twice in the S3 restore.
                    if all((name, i) in self._fetched for i in range(first, last + 1)):
                        return
                self._fetch(name, first, last)
        except Exception:
            pass  # only a hint: the read that needs these bytes fetches them and reports the error
        finally:
            with self._lock:
                self._ahead -= 1

    @contextmanager
    def _fetching(self, keys: list[tuple[str, int]]) -> Iterator[None]:
        """Hold the fetch locks of ``keys``, taken in ascending order (no deadlock)."""
        with self._lock:
            locks = []
            for key in keys:
                lk, users = self._fetch_locks.get(key, (threading.Lock(), 0))
                self._fetch_locks[key] = (lk, users + 1)
                locks.append(lk)
        try:
            with ExitStack() as stack:
                for lk in locks:
                    stack.enter_context(lk)
                yield
        finally:
            with self._lock:
                for key in keys:
                    lk, users = self._fetch_locks[key]
                    if users == 1:
                        del self._fetch_locks[key]
                    else:
                        self._fetch_locks[key] = (lk, users - 1)

    def _fetch(self, name: str, first: int, last: int) -> dict[int, Block]:
        b = self.block
        got = self._cached(name, first, last)
        missing = [i for i in range(first, last + 1) if i not in got]
        if not missing:
            return got
        lo, hi = missing[0], missing[-1]  # one GET for the gap (cached blocks inside are few)
        held = [0]  # bytes this GET has reserved
        try:
            data = get_sized(self.inner, name, lo * b, (hi - lo + 1) * b, lambda n: self._reserve(n, held))
        except BaseException:
            self._reserve(0, held)
            raise
        with self._lock:
            for i in range(lo, hi + 1):
                piece = data if lo == hi else data[(i - lo) * b:(i - lo + 1) * b]  # the usual case: no copy
                got[i] = piece
                self._kept += len(piece) - len(self._cache.pop((name, i), b""))
                self._cache[(name, i)] = piece
                self._fetched[(name, i)] = None
                if len(self._fetched) > 4096:
                    self._fetched.popitem(last=False)
            self._flight -= held[0]  # now kept, counted in _kept
            self._evict(self.keep - self._flight)  # only if the store sent more than it said
            self._room.notify_all()
        return got

    def _reserve(self, n: int, held: list[int]) -> None:
        """Reserve ``n`` bytes of the budget for a GET's response, in place of the ``held[0]``
        it had (a retry asks again), evicting kept blocks, least recently used first, or
        waiting for other GETs in flight. A waiter holds nothing, so some GET always
        proceeds; one alone may take more than the budget (a larger response than that)."""
        with self._room:
            self._flight -= held[0]
            held[0] = 0
            self._room.notify_all()
            # Pinned blocks cannot make room: wait for GETs in flight to end instead.
            while self._flight and self._flight + n + self._pinned() > self.keep:
                self._room.wait()
            self._evict(self.keep - self._flight - n)
            self._flight += n
            held[0] = n
            self.peak = max(self.peak, self._kept + self._flight)

    def _evict(self, limit: int) -> None:
        """Drop the least recently used blocks of packs not held until at most ``limit``
        bytes are kept, or only held ones are left (lock held)."""
        spared, spare = self._spared()
        if self._kept - spare <= limit:
            return
        free = [k for k in self._cache if k[0] not in self._holds and k not in spared]
        # Blocks read many times in small pieces go last: a tree pack, read a directory at
        # a time by the walker, unheld, was dropped for data packs and fetched 4 times.
        for key in sorted(free, key=lambda k: self._hits.get(k, 0) >= self.OFTEN):
            self._kept -= len(self._cache.pop(key))
            self._hits.pop(key, None)
            if self._kept - spare <= limit:
                return

    def _spared(self) -> tuple[set[tuple[str, int]], int]:
        """The kept blocks of favoured packs not held that stay outside the budget, the most
        recently used first up to ``SPARE`` bytes, and their bytes (lock held)."""
        keys: set[tuple[str, int]] = set()
        total = 0
        if self._favoured:
            for key in reversed(self._cache):
                if key[0] in self._favoured and key[0] not in self._holds:
                    size = len(self._cache[key])
                    if total + size <= self.SPARE:
                        keys.add(key)
                        total += size
        return keys, total

    def _pinned(self) -> int:
        """Bytes of kept blocks of held packs (lock held)."""
        return sum(len(v) for k, v in self._cache.items() if k[0] in self._holds) if self._holds else 0

    def _cached(self, name: str, first: int, last: int) -> dict[int, Block]:
        out = {}
        with self._lock:
            for i in range(first, last + 1):
                piece = self._cache.get((name, i))
                if piece is not None:
                    self._cache.move_to_end((name, i))
                    self._hits[(name, i)] = self._hits.get((name, i), 0) + 1
                    out[i] = piece
        return out

    def _forget(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == name]:
                self._kept -= len(self._cache.pop(key))
                self._hits.pop(key, None)
            self._seen.pop(name, None)
            for key in [k for k in self._fetched if k[0] == name]:
                del self._fetched[key]
            self._favoured.pop(name, None)

    def put(self, name: str, data: bytes) -> None:
        self._forget(name)
        self.inner.put(name, data)

    def put_file(self, name: str, fd: int, size: int) -> None:
        self._forget(name)
        put_file(self.inner, name, fd, size)

    def delete(self, name: str) -> None:
        self._forget(name)
        self.inner.delete(name)
