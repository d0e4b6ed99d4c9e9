"""No snapshot: read the live tree."""

from __future__ import annotations

import os

from deltavault.snapshot.base import SnapshotHandle


class NoSnapshot:
    kind = "none"

    def __init__(self, note: str = "") -> None:
        self.note = note

    def create(self, path: str) -> SnapshotHandle:
        return SnapshotHandle("none", path, path, path, note=self.note)

    def remove(self, handle: SnapshotHandle) -> None:
        pass


def relative_inside(path: str, root: str) -> str:
    """path relative to root ('' for root itself); both real paths."""
    rel = os.path.relpath(path, root)
    return "" if rel == "." else rel
