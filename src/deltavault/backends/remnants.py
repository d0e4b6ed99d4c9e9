"""What a read-ahead keeps of a pack it drops while a plan still reads some of it: those
ranges only (backends/readahead.py).

A read-ahead keeps whole packs, a few at a time. A restore's plan (repository/plan.py)
names the packs it reads again later, and the read-ahead keeps them while its budget allows;
when the packs read now need the room, such a pack was dropped and fetched whole again later
for a few of its blobs (issue #17: 34 MB of a pack for the small files of a later directory).
Instead its planned ranges are copied out and kept, counted in the same budget: the later
reads are served from them, and nothing is fetched twice.
"""

from __future__ import annotations

import mmap
from typing import Protocol


class Plan(Protocol):
    """A restore's reads to come, by pack (object name)."""

    def next_use(self, name: str) -> int | None:
        """The number of the next planned read of the pack (higher: later); None if none
        is planned; -1 if the plan does not know the pack."""
        ...

    def ranges(self, name: str) -> list[tuple[int, int]]:
        """(offset, end) of the pack's planned reads not done, ascending, not overlapping."""
        ...


class Remnants:
    """Not thread-safe: the read-ahead's lock guards it. ``size`` is the bytes kept."""

    def __init__(self) -> None:
        self._pieces: dict[str, list[tuple[int, bytes]]] = {}  # pack -> (offset, bytes), ascending
        self.size = 0

    def cut(self, name: str, start: int, block: memoryview, ranges: list[tuple[int, int]]) -> None:
        """Keep the parts of ``block`` (the pack's bytes from ``start``) inside ``ranges``,
        in place of what was kept of that block before."""
        end = start + len(block)
        pieces = []
        for lo, piece in self._pieces.pop(name, []):
            if start <= lo < end:
                self.size -= len(piece)
            else:
                pieces.append((lo, piece))
        for lo, hi in ranges:
            lo, hi = max(lo, start), min(hi, end)
            if lo < hi:
                pieces.append((lo, bytes(block[lo - start:hi - start])))
                self.size += hi - lo
        if pieces:
            self._pieces[name] = pieces

    def find(self, name: str, offset: int, length: int) -> bytes | None:
        """The ``length`` bytes at ``offset`` if one kept piece holds them all."""
        for lo, piece in self._pieces.get(name, ()):
            if lo <= offset and offset + length <= lo + len(piece):
                return piece[offset - lo:offset - lo + length]
        return None

    def names(self) -> list[str]:
        return list(self._pieces)

    def drop(self, name: str) -> None:
        self.size -= sum(len(p) for _o, p in self._pieces.pop(name, []))


class Planned:
    """A read-ahead's plan and the remnants kept by it (the read-ahead's lock guards it).
    Each call that keeps or drops bytes returns the change in bytes kept."""

    def __init__(self) -> None:
        self.plan: Plan | None = None
        self.remnants = Remnants()

    def follow(self, plan: Plan | None) -> int:
        self.plan = plan
        return -sum(self.forget(name) for name in self.remnants.names())

    def known(self, name: str) -> bool:
        """Whether the plan names the pack (its reads to come are known)."""
        return self.plan is not None and self.plan.next_use(name) != -1

    def rank(self, name: str) -> tuple[int, int]:
        """No planned use first, then the furthest next use (lower: dropped first)."""
        nxt = self.plan.next_use(name) if self.plan is not None else None
        return (0, 0) if nxt is None else (1, -nxt)

    def dropped(self, name: str, start: int, block: bytes | mmap.mmap) -> int:
        """A block of the pack from ``start`` is dropped: keep its planned ranges."""
        nxt = self.plan.next_use(name) if self.plan is not None else None
        if self.plan is None or nxt is None or nxt < 0:
            return 0
        before = self.remnants.size
        self.remnants.cut(name, start, memoryview(block), self.plan.ranges(name))
        return self.remnants.size - before

    def stale(self) -> int:
        """Drop the remnants of packs with no planned read left."""
        plan = self.plan
        return -sum(self.forget(n) for n in self.remnants.names() if plan is None or plan.next_use(n) is None)

    def shed(self, excess: int) -> int:
        """Drop remnants, furthest use first, until ``excess`` bytes are gone or none is left."""
        freed = 0
        for name in sorted(self.remnants.names(), key=self.rank):
            if freed >= excess:
                break
            freed += self.forget(name)
        return -freed

    def forget(self, name: str) -> int:
        """Drop the pack's remnants; the bytes freed."""
        before = self.remnants.size
        self.remnants.drop(name)
        return before - self.remnants.size
