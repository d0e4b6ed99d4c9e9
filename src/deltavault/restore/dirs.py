"""The directories of a file restore while it runs: what each still waits for, and its
metadata set once nothing below it is left to write.

A directory's metadata is set last: its mode may forbid writes, and every entry made in
it changes its times. The walker, the small-file batches and the workers all hold and
release directories, so the counts are kept under one lock.
"""

from __future__ import annotations

import os
import threading

from deltavault.fs.dirfd import Identity, Replaced, identity, open_dir_at
from deltavault.model.nodes import Node
from deltavault.restore.options import RestoreLog
from deltavault.restore.target import MadeIn, MetaOptions, apply_node_meta


class Dir:
    """A directory of the target being restored. ``left`` counts the walker's hold (released
    when its listing is done), its files being written and its subdirectories not yet
    finished; the last release sets its metadata. ``fd`` is -1 while the walk is far below
    (or once it was found moved: ``lost``)."""

    __slots__ = ("fd", "files", "fresh", "ident", "left", "lost", "made", "node", "parent", "relpath")

    def __init__(self, fd: int, ident: Identity, relpath: bytes, node: Node | None,
                 parent: Dir | None, fresh: bool) -> None:
        self.fd, self.ident, self.relpath, self.node, self.parent = fd, ident, relpath, node, parent
        self.fresh = fresh  # made 0700 by this run: nobody else can have put anything in it
        self.made: MadeIn | None = None  # when fresh: what a file made in it is given
        self.left = 1
        self.files = 0  # files queued or being written in it (its fd must stay open)
        self.lost = False


class Holds:
    def __init__(self, log: RestoreLog, meta: MetaOptions) -> None:
        self.log = log
        self.meta = meta
        self.lock = threading.Lock()
        self.open_dirs = 0  # directory fds held, for the bound on open files

    def opened(self) -> None:
        with self.lock:
            self.open_dirs += 1

    def hold(self, d: Dir, *, file: bool = False) -> None:
        """One more thing below ``d`` to finish before its metadata is applied."""
        with self.lock:
            d.left += 1
            d.files += file

    def writing(self, d: Dir) -> bool:
        """Files are queued or being written in ``d``: its fd must stay open."""
        with self.lock:
            return d.files > 0

    def file_done(self, d: Dir) -> None:
        with self.lock:
            d.files -= 1
        self.release(d)

    def release(self, d: Dir | None) -> None:
        """One thing below ``d`` is finished; the last one applies its metadata, then
        counts for its parent. The target root's own metadata is the user's (restore/root.py)."""
        while d is not None:
            with self.lock:
                d.left -= 1
                if d.left:
                    return
            if d.node is None:
                return
            if d.fd >= 0:
                try:
                    for m in apply_node_meta(d.fd, d.node, self.meta):
                        self.log.problem(d.relpath, "metadata", m)
                finally:
                    self.close(d)
                self.log.count(dirs=1)
            d = d.parent

    def close(self, d: Dir) -> None:
        fd, d.fd = d.fd, -1
        os.close(fd)
        with self.lock:
            self.open_dirs -= 1


def reopen_by_name(chain: list[Dir]) -> int:
    """The last directory of ``chain`` (the walk's stack, target root first), opened again by
    name from the deepest one still open, each level checked to be the directory it was."""
    start = max(i for i, d in enumerate(chain) if d.fd >= 0)
    fd = os.dup(chain[start].fd)
    try:
        for d in chain[start + 1:]:
            assert d.node is not None
            nfd = open_dir_at(fd, d.node.name)
            os.close(fd)
            fd = nfd
            if identity(os.fstat(fd)) != d.ident:
                raise Replaced("another directory stands under this name")
    except BaseException:
        os.close(fd)
        raise
    return fd
