"""The directories of a local sync while it is in them: their fds, and when each is done.

A directory holds an fd of SRC and one of DST while the walk is in it or files of its own
are being copied (they use its fds). The walk holds at most MAX_OPEN_DIRS of them open:
deeper, the shallowest are closed (once their own copies are done) and opened again
through ".." when the walk climbs back, or else by name from the run's root, each level
checked to be the directory it was. A directory is done once the walk has left it and
everything below is in place: then its metadata is set (writing into a directory changes
its mtime). One waiting only for its subdirectories lets its fds go; the thread whose
release takes its count to zero opens it again (through ".." of the child that finished
it) to set its metadata.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from typing import Literal

from deltavault.fs.dirfd import (
    Identity,
    identity,
    open_dir_path,
    open_parent_checked,
)
from deltavault.fs.ntfs import ReadResult
from deltavault.fs.paths import display
from deltavault.sync.local.context import LocalRun
from deltavault.sync.local.deferred import DeferredMeta
from deltavault.sync.receiver.temps import Where
from deltavault.sync.sender.source import Item, Xattrs
from deltavault.sync.tree import MAX_OPEN_DIRS, open_checked


@dataclass(eq=False)
class Dir:
    """A directory being synced."""

    relpath: bytes
    st: os.stat_result  # the source directory's
    xattrs: Xattrs
    sfd: int  # -1: closed for now
    dfd: int
    parent: Dir | None
    fresh: bool  # created by this run: DST holds nothing here yet
    sident: Identity
    dident: Identity
    smnt: int = -1  # mount ids, to see mount roots below
    dmnt: int = -1
    included: bool = True
    listed: bool = True  # False: not listed (a loop or overlap): kept empty, nothing deleted
    items: list[Item] = field(default_factory=list)
    next: int = 0  # the next item the walk takes
    kept: int = 0  # entries kept (for --skip-empty-dirs)
    pending: int = 1  # the walker's hold, + unfinished files and subdirectories
    jobs: int = 0  # files of its own being copied (they use its fds)
    walked: bool = False  # the walk is done with it
    lost: bool = False  # moved away during the run: not reachable any more
    deferred: bool = False  # hard links will be made here: metadata after them
    dropped: bool = False  # removed (--skip-empty-dirs): no metadata
    ntfs: ReadResult | None = None  # the source directory's NTFS metadata (local/ntfs.py)

    @property
    def name(self) -> bytes:
        return self.relpath.rpartition(b"/")[2]

    @property
    def where(self) -> Where:
        return self.relpath, self.dident


def chain(d: Dir | None) -> list[Dir]:
    """d and the directories above it, from the run's root down."""
    out = []
    while d is not None:
        out.append(d)
        d = d.parent
    return out[::-1]


class Dirs:
    """Opening, bounding, releasing and finishing the directories of a run. ``lock`` guards
    every directory's counts and fds (``idle`` is told when a directory's copies are done)."""

    def __init__(self, run: LocalRun, deferred: DeferredMeta) -> None:
        self.run = run
        self.deferred = deferred
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self._open: set[Dir] = set()

    def enter(self, parent: Dir | None, relpath: bytes, st: os.stat_result, sfd: int, dfd: int, *,
              fresh: bool, included: bool, dident: Identity, smnt: int, dmnt: int,
              xattrs: Xattrs | Literal["read"] = "read") -> Dir:
        """A directory the walk goes into: it owns ``sfd`` and ``dfd`` from now on.
        ``xattrs``: the ones to mirror, if its caller read them (with its NTFS streams)."""
        if xattrs == "read":
            xattrs = self.run.source.xattrs(relpath, fd=sfd)
        d = Dir(relpath, st, xattrs, sfd, dfd, parent, fresh, identity(st), dident, smnt, dmnt, included)
        if self.run.ntfs is not None:
            d.ntfs = self.run.ntfs.read_dir(sfd)
        with self.lock:
            self._open.add(d)
            if parent is not None:
                parent.pending += 1
        return d

    def hold(self, parent: Dir) -> None:
        """Work below ``parent`` that it must wait for (a subtree in a worker process)."""
        with self.lock:
            parent.pending += 1

    # ------------------------------------------------------------------ fds
    def bound(self, stack: list[Dir], closed_below: int) -> int:
        """Close the shallowest open directories beyond MAX_OPEN_DIRS (once their own
        copies are done: those use their fds). Returns the new ``closed_below``."""
        while len(stack) - closed_below > MAX_OPEN_DIRS:
            f = stack[closed_below]
            with self.idle:
                while f.jobs:
                    self.idle.wait(0.5)
                self.close_fds(f)
            closed_below += 1
        return closed_below

    def reopen(self, stack: list[Dir], child: Dir) -> None:
        """Open again the (closed) directory on top of ``stack``: through ".." of ``child``,
        or else by name from the run's root, each level checked to be what it was."""
        top = stack[-1]
        s = open_parent_checked(child.sfd, top.sident)
        d = open_parent_checked(child.dfd, top.dident)
        if s is None or d is None:
            for fd in (s, d):
                if fd is not None:
                    os.close(fd)
            try:
                s = self.open_chain(top, src=True)
                try:
                    d = self.open_chain(top, src=False)
                except BaseException:
                    os.close(s)
                    raise
            except OSError:
                top.lost = True
                self.run.out.problem(top.relpath, "changed", "moved during the run; its entries after "
                                     f"{display(top.items[top.next - 1][0]) if top.next else 'the start'} "
                                     "were not synced")
                return
        top.sfd, top.dfd = s, d

    def open_chain(self, d: Dir, *, src: bool) -> int:
        """d's directory in SRC or DST, opened from the run's root one level at a time, each
        checked to be the directory the walk met there."""
        dirs = chain(d)
        fd = open_dir_path(self.run.sroot if src else self.run.droot, dirs[0].relpath)
        try:
            if identity(os.fstat(fd)) != (dirs[0].sident if src else dirs[0].dident):
                raise OSError(errno.ESTALE, "replaced")
        except BaseException:
            os.close(fd)
            raise
        return open_checked(fd, ((x.name, x.sident if src else x.dident) for x in dirs[1:]))

    def close_fds(self, d: Dir) -> None:
        for fd in (d.sfd, d.dfd):
            if fd >= 0:
                os.close(fd)
        d.sfd = d.dfd = -1

    def close_all(self) -> None:
        """The fds an interruption left open."""
        for d in list(self._open):
            self.close_fds(d)

    # ------------------------------------------------------------------ copies
    def job_started(self, d: Dir) -> None:
        with self.lock:
            d.pending += 1
            d.jobs += 1

    def job_done(self, d: Dir) -> None:
        with self.idle:
            d.jobs -= 1
            self.idle.notify_all()
        self.release(d)

    # ------------------------------------------------------------------ the end of a directory
    def leave(self, d: Dir, parent: Dir | None) -> int:
        """The walk is done with d: returns whether it is kept in its parent (--skip-empty-dirs)."""
        run = self.run
        if d.fresh and parent is not None:
            run.out.done("mkdir", d.relpath, 0)
        if parent is not None and d.kept == 0 and run.opts.skip_empty_dirs:
            d.dropped = True
        with self.lock:
            d.walked = True
        self.release(d)
        if not d.dropped or parent is None:
            return 1
        try:
            os.rmdir(d.name, dir_fd=parent.dfd)
        except OSError:
            return 1  # DST keeps entries of its own here; its metadata stays as it was
        if d.fresh:
            run.out.count(dirs_created=-1)
        return 0

    def release(self, d: Dir) -> None:
        """One piece of d's work is done; the last one finishes d, then its parent. A parent
        whose fds were let go (only its subdirectories' work was left) is opened again
        through ".." of the child that finishes it, by whichever thread takes its count to
        zero: deciding before the count is taken would race with a sibling's release."""
        child: Dir | None = None
        while True:
            with self.lock:
                d.pending -= 1
                if d.pending:
                    if d.walked and not d.jobs:
                        self.close_fds(d)  # only its subdirectories' work is left
                    last = False
                else:
                    self._open.discard(d)
                    last = True
            if not last:
                if child is not None:
                    self.close_fds(child)
                return
            if child is not None:
                if d.dfd < 0 and not (d.lost or d.dropped or d.deferred):
                    self._reopen_for_meta(d, child)
                self.close_fds(child)
            self._finish(d)
            if d.parent is None:
                self.close_fds(d)
                return
            child, d = d, d.parent

    def _reopen_for_meta(self, p: Dir, child: Dir) -> None:
        fd = open_parent_checked(child.dfd, p.dident) if child.dfd >= 0 else None
        if fd is None:
            try:
                fd = self.open_chain(p, src=False)
            except OSError:
                p.lost = True
                self.run.out.problem(p.relpath, "changed", "moved during the run; its metadata was not set")
                return
        p.dfd = fd

    def _finish(self, d: Dir) -> None:
        if d.dropped:
            return
        if d.deferred:
            self.deferred.add(d.relpath, d.st, d.xattrs, d.dident, d.ntfs)
            return
        if d.dfd >= 0:
            self.run.rx.dir_meta(d.dfd, d.relpath, d.st, d.xattrs)
            if d.ntfs is not None and self.run.ntfs is not None:
                self.run.ntfs.finish_dir(d.dfd, d.relpath, d.ntfs, self.run.out)
        elif not d.lost:  # (a directory moved away is reported when it is found so)
            self.run.out.problem(d.relpath, "metadata", "not reachable when its entries were done; "
                                 "its metadata was not set")
