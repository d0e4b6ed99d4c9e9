"""Files whose metadata cannot vouch for their data next time: those changed in the last
second before the volume was captured.

A metadata digest trusts that a file whose content changes gets a new ctime. The kernel
stamps times at its clock's granularity (one second in 128-byte ext2/3/4 inodes; a timer
tick, a few milliseconds, in larger ones) and does not write the inode again when a
write leaves its times as they were: a file written in the second the volume was
captured (frozen, unmounted, snapshotted), and again in that second after the capture,
keeps the inode the digest was taken of, with other data. Its digest would then vouch for
stale blocks in every later run, a change missed for good (git's "racy clean" entries).

So the digests of such files are stored as zero bytes (``Racy.mark``), which no digest
equals: the next run reads their data. The capture time is not on disk; it is no earlier than the newest time
the file system holds (every ctime, the superblock's last write and mount), so a file is
racy when its ctime lies within ``WINDOW`` of that newest time. Times later than this
machine's clock (a clock that was ahead) are racy themselves and do not count as the
newest: a clock set back during the file system's life is the one case not covered.
"""

from __future__ import annotations

import time

WINDOW = 1  # seconds: one whole second of 128-byte inodes, and ticks that straddle a second


class Racy:
    """Collects, during one digest scan, the objects changed too close to the capture."""

    def __init__(self, other_times: list[int], now: int | None = None) -> None:
        self.now = int(time.time()) if now is None else now
        self.newest = max((t for t in other_times if t <= self.now), default=0)
        self._near: list[tuple[int, int]] = []  # (object, ctime) within WINDOW of the newest so far
        self._future: list[int] = []

    def see(self, obj: int, ctime: int | None) -> None:
        """``ctime`` in whole seconds since the epoch; None: none to judge by (racy)."""
        if ctime is None or ctime > self.now:
            self._future.append(obj)
            return
        if ctime > self.newest:
            self.newest = ctime
            self._near = [(o, c) for o, c in self._near if c >= ctime - WINDOW]
        if ctime >= self.newest - WINDOW:
            self._near.append((obj, ctime))

    def objects(self) -> list[int]:
        """Those whose digest must not vouch for their data next time."""
        return self._future + [o for o, c in self._near if c >= self.newest - WINDOW]

    def mark(self, digests: dict[int, bytes]) -> None:
        """Store, for each of ``objects``, a digest of zero bytes in place of its own."""
        for o in self.objects():
            digests[o] = bytes(len(digests[o]))
