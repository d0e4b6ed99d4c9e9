"""Removing entries of DST (--delete, and a directory in the way of a file): fs/remove.py,
shared with restore, within sync's budget of open directories."""

from __future__ import annotations

import os
from collections.abc import Callable

from deltavault.fs.remove import MountPoint
from deltavault.fs.remove import remove_entry as _remove_entry
from deltavault.sync.tree import MAX_OPEN_DIRS

__all__ = ["MountPoint", "remove_entry"]


def remove_entry(dir_fd: int, name: bytes, relpath: bytes,
                 removed: Callable[[bytes, os.stat_result], None]) -> None:
    """Remove a file or a whole directory tree; ``removed`` is told of each entry, children
    first (fs/remove.remove_entry)."""
    _remove_entry(dir_fd, name, relpath, removed, MAX_OPEN_DIRS)
