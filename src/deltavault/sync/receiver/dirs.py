"""The agent's directories of DST: their identities, and fds for the most recently used.

The agent is told of directories by path, in the order the sender walks them, and comes
back to each (its files, its end) later; so it keeps every directory's identity and at
most MAX_OPEN_DIRS fds. A directory not open is opened again from its nearest open
ancestor (or DST's root), one name at a time with O_NOFOLLOW, each checked to be the
directory recorded: one swapped or moved meanwhile is refused (Replaced).
"""

from __future__ import annotations

import os

from deltavault.fs.dirfd import (
    Identity,
    Replaced,
    identity,
    mount_id,
    open_parent_checked,
)
from deltavault.sync.tree import MAX_OPEN_DIRS, open_checked


class OpenDirs:
    """DST's directories of this run: their identities, and fds for the most recently used
    (at most MAX_OPEN_DIRS). One not open is opened again from its nearest open ancestor,
    one level at a time, each checked to be the directory recorded (a directory swapped
    or moved meanwhile is refused: Replaced)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.ids: dict[bytes, Identity] = {b"": identity(os.fstat(root))}
        self.mounts: dict[bytes, int] = {b"": mount_id(root)}
        self._fds: dict[bytes, int] = {}  # in use order, oldest first

    def record(self, rel: bytes, fd: int, mnt: int) -> None:
        """A directory just made or met, and checked; ``fd`` is closed (``get`` opens it
        again when its listing comes)."""
        try:
            self.ids[rel] = identity(os.fstat(fd))
            self.mounts[rel] = mnt
        finally:
            os.close(fd)

    def known(self, rel: bytes) -> bool:
        return rel in self.ids

    def get(self, rel: bytes) -> int:
        """An fd of DST/rel, owned by the cache (valid until the next call)."""
        fd = self._fds.pop(rel, -1)
        if fd < 0:
            fd = self._open(rel)
        self._keep(rel, fd)
        return fd

    def climb(self, rel: bytes) -> None:
        """Before DST/rel is forgotten: open its parent through "..", checked, if it is not
        open (a deep tree is left one level at a time)."""
        parent = rel.rpartition(b"/")[0]
        if rel and parent not in self._fds and rel in self._fds and parent in self.ids:
            fd = open_parent_checked(self._fds[rel], self.ids[parent])
            if fd is not None:
                self._keep(parent, fd)

    def forget(self, rel: bytes) -> None:
        fd = self._fds.pop(rel, -1)
        if fd >= 0:
            os.close(fd)

    def _open(self, rel: bytes) -> int:
        if rel not in self.ids:
            raise Replaced("not a directory of this run")
        parts = rel.split(b"/") if rel else []
        k = len(parts)
        while k and b"/".join(parts[:k]) not in self._fds:
            k -= 1
        base = b"/".join(parts[:k])
        fd = os.dup(self._fds[base] if k else self.root)
        return open_checked(fd, ((parts[i], self.ids[b"/".join(parts[:i + 1])]) for i in range(k, len(parts))))

    def _keep(self, rel: bytes, fd: int) -> None:
        old = self._fds.pop(rel, -1)
        if old >= 0 and old != fd:
            os.close(old)
        self._fds[rel] = fd
        while len(self._fds) > MAX_OPEN_DIRS:
            oldest = next(iter(self._fds))
            os.close(self._fds.pop(oldest))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
