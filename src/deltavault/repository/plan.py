"""Which packs a restore will read again, and how soon: the future uses a read-ahead's
eviction goes by (backends/readahead.py ``ReadAheadBackend.future``).

A read-ahead keeps a bounded number of packs. Told only what readers hold now, it dropped a
pack no reader held although a later one needed it: an S3 restore read a 34 MB pack for the
first segments of a database and again, 9 to 15 s later, for small files of a later
directory (issue #17). Here a planning walk (restore/plan.py), ahead of the restore, adds the
blobs it will read in the order it reads them, each given the next number; a blob read is
taken out. A pack's next use is the lowest number of its blobs not read yet, or None: the
read-ahead drops packs with no next use first, then the one whose next use is furthest.

Only a hint: a blob read before the walk planned it is remembered (a bounded number of
them) and not planned then; a blob planned twice (two files with one content) is taken out
by its first read; one planned and never read (a file the restore skips) only keeps its pack
among those dropped later. At most ``AHEAD`` blobs are planned and not read: the planning
walk waits past it, so memory stays bounded on any snapshot.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

AHEAD = 50_000  # blobs planned and not read yet, at most
EARLY = 65_536  # blobs read before they were planned, remembered at most


class ReadPlan:
    """Thread-safe. ``locate`` gives the pack (object name) a blob is read from, or None."""

    def __init__(self, locate: Callable[[bytes], tuple[str, int, int] | None], gap: int, ahead: int = AHEAD) -> None:
        self._locate = locate
        self._gap = gap  # reads of a pack this close are one read (``ranges`` joins them)
        self._ahead = ahead
        self._cond = threading.Condition()
        self._seq = 0  # the next use's number
        self._pending: dict[bytes, str] = {}  # blob planned, not read -> its pack
        # pack -> (number, blob, offset, length), ascending numbers
        self._uses: dict[str, deque[tuple[int, bytes, int, int]]] = {}
        self._early: OrderedDict[bytes, None] = OrderedDict()  # read before planned (bounded)
        self._closed = False

    def add(self, ids: Iterable[bytes]) -> bool:
        """Plan the reads of ``ids``, in the order they come, after those planned before.
        Waits while ``ahead`` blobs are planned and not read; False once closed (stop)."""
        located = [(bid, self._locate(bid)) for bid in ids]  # outside the lock: index lookups
        with self._cond:
            while not self._closed and len(self._pending) >= self._ahead:
                self._cond.wait()
            if self._closed:
                return False
            for bid, loc in located:
                if loc is None or bid in self._pending:
                    continue
                pack, offset, length = loc
                uses = self._uses.setdefault(pack, deque())
                if bid in self._early:  # read already: the walk lags behind the restore here
                    del self._early[bid]
                    continue
                self._pending[bid] = pack
                uses.append((self._seq, bid, offset, length))
                self._seq += 1
        return True

    def full(self) -> bool:
        """Whether ``add`` would wait."""
        with self._cond:
            return len(self._pending) >= self._ahead

    def read(self, bid: bytes) -> None:
        """The restore has read ``bid``: its planned use is past."""
        with self._cond:
            if self._pending.pop(bid, None) is None:
                if not self._closed:
                    self._early[bid] = None
                    if len(self._early) > EARLY:
                        self._early.popitem(last=False)
                return
            if len(self._pending) == self._ahead - 1:
                self._cond.notify_all()

    def next_use(self, pack: str) -> int | None:
        """The number of the next planned read of ``pack``; None if none is planned; -1 for a
        pack the plan never named (a tree pack: the walk's listings are not planned), whose
        reads are not known."""
        with self._cond:
            uses = self._uses.get(pack)
            if uses is None:
                return -1
            while uses:
                seq, bid, _o, _n = uses[0]
                if bid in self._pending:
                    return seq
                uses.popleft()  # read
            return None

    def ranges(self, pack: str) -> list[tuple[int, int]]:
        """(offset, end) of the planned reads of ``pack`` not done, ascending; those less
        than ``gap`` apart joined, as the reads join them (``BlobReader.load_many``)."""
        with self._cond:
            spans = sorted((o, o + n) for _s, bid, o, n in self._uses.get(pack, ()) if bid in self._pending)
        out: list[tuple[int, int]] = []
        for lo, hi in spans:
            if out and lo - out[-1][1] < self._gap:
                out[-1] = (out[-1][0], max(out[-1][1], hi))
            else:
                out.append((lo, hi))
        return out

    def close(self) -> None:
        """The restore is over: a waiting ``add`` returns False, and nothing is kept."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._uses.clear()
            self._early.clear()
            self._cond.notify_all()
