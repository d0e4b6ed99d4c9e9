"""What both sides' walks share: paths relative to a tree's root, and how many directory
fds a walk holds at most.

Every walk (SRC by the sender, DST by the receiver, both at once by the local engine, a
removal by --delete) keeps its own stack instead of recursing, so depth does not matter,
and resolves no path, so PATH_MAX does not apply. Deeper than MAX_OPEN_DIRS, the
shallowest directories are closed and opened again through ".." when the walk climbs
back, each checked to be the directory it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from deltavault.fs.dirfd import Identity, open_dir_checked

# Two per level in the local engine (SRC and DST), so any depth syncs under a 256-file limit.
MAX_OPEN_DIRS = 64


def join(rel: bytes, name: bytes) -> bytes:
    """The path of ``name`` in the directory ``rel`` (b"" is the root)."""
    return rel + b"/" + name if rel else name


def open_checked(fd: int, steps: Iterable[tuple[bytes, Identity]]) -> int:
    """From the directory ``fd`` (taken: closed here), open each name of ``steps`` in turn,
    each checked to be the directory given with it (fs.dirfd.open_dir_checked: no symlink
    followed, the same (dev, ino)). Returns the last one's fd."""
    try:
        for name, ident in steps:
            nfd = open_dir_checked(fd, name, ident)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise
