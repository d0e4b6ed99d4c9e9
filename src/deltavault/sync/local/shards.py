"""Subtrees synced by worker processes.

A tree of small files costs a dozen short system calls per file. In one Python process the
GIL serialises them (threads hand the GIL over at every call, which costs more than it
saves), so the walk is split: the main process walks the top levels and hands whole
subtrees to forked workers (local/pool.py), each running its own engine on the subtree
(local/engine.py). Workers report progress through their own pipe, append to the same log
(one write per line, O_APPEND), share one cancel flag, and return their counters, problems
and hard-link groups; ``Shards`` merges them into the main process's run, which links hard
links that span subtrees once all are done.
"""

from __future__ import annotations

import os
from typing import Any

from deltavault.fs.dirfd import Identity, identity
from deltavault.fs.ntfs import ReadResult
from deltavault.sync.local.context import LocalRun
from deltavault.sync.local.deferred import DeferredMeta
from deltavault.sync.local.dirs import Dir, Dirs, chain
from deltavault.sync.local.links import Links
from deltavault.sync.local.pool import ShardPool, ShardResult
from deltavault.sync.tree import join


def shard_depth(sfd: int, workers: int, excluded: Any, max_depth: int = 4) -> int | None:
    """The shallowest depth with enough directories to keep the workers busy (None: too few)."""
    level: list[tuple[bytes, int]] = [(b"", os.dup(sfd))]
    best: tuple[int, int] | None = None
    try:
        for depth in range(1, max_depth + 1):
            nxt: list[tuple[bytes, int]] = []
            for rel, fd in level:
                try:
                    with os.scandir(fd) as it:
                        names = [os.fsencode(e.name) for e in it if e.is_dir(follow_symlinks=False)]
                except OSError:
                    continue
                for n in names:
                    crel = join(rel, n)
                    if excluded(crel, n):
                        continue
                    try:
                        nxt.append((crel, os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)))
                    except OSError:
                        continue
            for _rel, fd in level:
                os.close(fd)
            level = nxt
            if len(level) >= 16 * workers:
                return depth
            if len(level) >= 2 and (best is None or len(level) > best[1]):
                best = (depth, len(level))
            if not level:
                break
        return best[0] if best else None
    finally:
        for _rel, fd in level:
            os.close(fd)


class Shards:
    """Subtrees at ``depth`` handed to worker processes, and what comes back merged into
    this run: counters, problems, hard-link groups (one spanning subtrees is linked here),
    --skip-empty-dirs, and the subtree root's metadata (set at the end)."""

    def __init__(self, run: LocalRun, dirs: Dirs, links: Links, deferred: DeferredMeta, pool: ShardPool,
                 depth: int) -> None:
        self.run, self.dirs, self.links, self.deferred = run, dirs, links, deferred
        self.depth = depth
        self._pool: ShardPool | None = pool

    def wants(self, relpath: bytes) -> bool:
        return self._pool is not None and relpath.count(b"/") + 1 == self.depth

    def close(self) -> None:
        """Wait for every subtree handed out (after a cancel, workers skip what is left)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def delegate(self, parent: Dir, relpath: bytes, st: os.stat_result, created: bool, included: bool,
                 dident: Identity, xattrs: list[tuple[bytes, bytes]] | None, ntfs: ReadResult | None = None) -> None:
        """A worker process syncs this subtree; its metadata is applied at the end."""
        assert self._pool is not None
        d = Dir(relpath, st, xattrs, -1, -1, parent, created, identity(st), dident, deferred=True, walked=True,
                ntfs=ntfs)
        self.dirs.hold(parent)
        seen = [x.sident for x in chain(parent)]
        self._pool.submit(relpath, created, included, (d.sident, d.dident), seen, lambda r: self._done(d, r))

    def _done(self, d: Dir, r: ShardResult | None) -> None:
        run = self.run
        if r is None:
            if not run.cancelled():
                run.out.problem(d.relpath, "write", "the worker process syncing it died (killed): files below it "
                                "may not be synced; run the sync again")
            self.dirs.release(d)
            return
        run.out.merge(r.stats, r.problems, r.stopped)
        run.rx.groups.targets.update(r.targets)
        self.links.add_dir_ids(r.dir_ids)
        if r.fatal is not None:
            kind, _, message = r.fatal.partition(": ")
            if kind == "NoSpace":
                run.out.no_space(d.relpath, message)
            else:
                run.out.problem(d.relpath, "write", f"worker process failed: {r.fatal}")
                run.stop()
        for key, paths in r.links.items():
            first = run.source.first_path(key, paths[0])
            if first == paths[0]:
                continue
            # The inode is already in DST under another subtree's path: link these to it.
            # What the worker copied and linked for them is redone, so not counted twice.
            undo = {"hardlinks": -sum(p in r.links_made for p in paths)}
            if paths[0] in r.link_copies:
                undo[r.link_copies[paths[0]]] = -1
            run.out.count(**undo)
            self.links.relink(paths, first)
        if r.kept == 0 and run.opts.skip_empty_dirs and d.parent is not None:
            self._drop(d, d.parent)
        self.dirs.release(d)

    def _drop(self, d: Dir, parent: Dir) -> None:
        with self.dirs.lock:  # the walker may be using or closing the parent's fds
            pfd = parent.dfd
            tmp = -1
            try:
                if pfd < 0:
                    pfd = tmp = self.dirs.open_chain(parent, src=False)
                os.rmdir(d.name, dir_fd=pfd)
            except OSError:
                return
            finally:
                if tmp >= 0:
                    os.close(tmp)
        d.dropped = True
        if d.fresh:
            self.run.out.count(dirs_created=-1)
