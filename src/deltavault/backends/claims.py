"""Byte ranges of one object that the read-ahead has fetched or is fetching (readahead.py):
sorted, disjoint, half-open ``[lo, hi)`` ranges."""

from __future__ import annotations

import bisect


class Claims:
    def __init__(self) -> None:
        self._lo: list[int] = []  # starts, ascending
        self._hi: list[int] = []  # the matching ends
        self.size: int | None = None  # the object's, once a GET came short at its end

    def add(self, lo: int, hi: int) -> None:
        """Claim ``[lo, hi)``, merged with the ranges it touches."""
        i = bisect.bisect_left(self._hi, lo)  # the first range ending at or after lo
        j = bisect.bisect_right(self._lo, hi)  # past the last range starting at or before hi
        if i < j:
            lo, hi = min(lo, self._lo[i]), max(hi, self._hi[j - 1])
        self._lo[i:j], self._hi[i:j] = [lo], [hi]

    def remove(self, lo: int, hi: int) -> None:
        """Withdraw ``[lo, hi)`` (a fetch that failed: the range was claimed by it alone)."""
        i = bisect.bisect_right(self._hi, lo)  # the first range ending after lo
        j = bisect.bisect_left(self._lo, hi)  # past the last range starting before hi
        keep_lo: list[int] = []
        keep_hi: list[int] = []
        if i < j and self._lo[i] < lo:
            keep_lo.append(self._lo[i])
            keep_hi.append(lo)
        if i < j and self._hi[j - 1] > hi:
            keep_lo.append(hi)
            keep_hi.append(self._hi[j - 1])
        self._lo[i:j], self._hi[i:j] = keep_lo, keep_hi

    def first_free(self, lo: int, hi: int) -> int | None:
        """The first byte of ``[lo, hi)`` not claimed, or None."""
        i = bisect.bisect_right(self._lo, lo) - 1  # the range starting at or before lo
        if i >= 0 and self._hi[i] > lo:
            lo = self._hi[i]
        return lo if lo < hi else None

    def end_below(self, at: int) -> int:
        """The end of the last range ending at or before ``at`` (an unclaimed byte), else 0."""
        i = bisect.bisect_right(self._hi, at) - 1
        return self._hi[i] if i >= 0 else 0

    def start_above(self, at: int) -> int | None:
        """The start of the first range starting after ``at``, or None."""
        i = bisect.bisect_right(self._lo, at)
        return self._lo[i] if i < len(self._lo) else None

    def __bool__(self) -> bool:
        return bool(self._lo)

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._lo, self._hi))
