"""Subtrees synced by worker processes.

A tree of small files costs a dozen short system calls per file. In one Python process the
GIL serialises them (threads hand the GIL over at every call, which costs more than it
saves), so the walk is split: the main process walks the top levels and hands whole
subtrees to forked workers, each running its own engine on the subtree (local/engine.py).
Workers report progress through a queue, append to the same log (one write per line,
O_APPEND), share one cancel event, and return their counters, problems and hard-link
groups; ``Shards`` merges them into the main process's run, which links hard links that
span subtrees once all are done.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deltavault.fs.dirfd import Identity, identity
from deltavault.fs.ntfs import ReadResult
from deltavault.progress import Reporter
from deltavault.sync.data import BufferPool
from deltavault.sync.local.context import LocalRun
from deltavault.sync.local.deferred import DeferredMeta
from deltavault.sync.local.dirs import Dir, Dirs, chain
from deltavault.sync.local.links import Links
from deltavault.sync.report import SyncLog, SyncProblem, SyncStats
from deltavault.sync.tree import join
from deltavault.workers import release_signals, signals_held

Task = tuple[bytes, bool, bool, tuple[Identity, Identity], list[Identity]]  # relpath, fresh, included, expect, seen
# Syncs one subtree in a worker process: (task, its reporter, the worker's buffers, log).
Subtree = Callable[[Task, Reporter, BufferPool, "SyncLog | None"], "ShardResult"]


@dataclass
class ShardResult:
    stats: SyncStats
    problems: list[SyncProblem]
    stopped: bool
    fatal: str | None  # a NoSpace message
    kept: int  # entries kept in the subtree's root (for --skip-empty-dirs)
    links: dict[tuple[int, int], list[bytes]] = field(default_factory=dict)  # first path is the copy
    link_copies: dict[bytes, str] = field(default_factory=dict)
    links_made: set[bytes] = field(default_factory=set)
    targets: dict[bytes, tuple[Identity, bool]] = field(default_factory=dict)  # receiver Groups.targets
    dir_ids: dict[bytes, Identity] = field(default_factory=dict)  # Links.dir_ids


class QueueReporter:
    """A worker's Reporter: problems at once, progress summed and sent a few times a second."""

    wants_totals = False

    def __init__(self, q: Any) -> None:
        self.q = q
        self._bytes = self._items = 0
        self._last = time.monotonic()

    def start(self, phase: str, *, total_bytes: int | None = None, total_items: int | None = None) -> None:
        pass

    def set_totals(self, *, total_bytes: int | None = None, total_items: int | None = None) -> None:
        pass

    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
        self._bytes += nbytes
        self._items += items
        now = time.monotonic()
        if now - self._last > 0.2:
            self.flush(current)
            self._last = now

    def flush(self, current: str | None = None) -> None:
        if self._bytes or self._items:
            self.q.put(("a", self._bytes, self._items, current))
            self._bytes = self._items = 0

    def problem(self, path: str, kind: str, message: str) -> None:
        self.q.put(("p", path, kind, message))

    def finish(self) -> None:
        self.flush()


def _die_with_parent() -> None:
    """A worker must not outlive the main process (it would hold DST files open)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(subtree: Subtree, bufsize: int, log_path: str | None, tasks: Any, out: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides; it sets the cancel event
    release_signals()  # held while it was forked (workers.signals_held)
    _die_with_parent()
    log = SyncLog(log_path) if log_path else None
    buffers = BufferPool(max(4096, -(-bufsize // 4096) * 4096))  # one per worker, not per subtree
    while True:
        task = tasks.get()
        if task is None:
            break
        tid, job = task
        rep = QueueReporter(out)
        result = subtree(job, rep, buffers, log)
        rep.finish()
        out.put(("r", tid, result))
    out.put(("x", os.getpid()))


class ShardPool:
    """Forked worker processes taking subtrees from a queue. Forked at once, while the
    caller still has a single thread."""

    def __init__(self, n: int, subtree: Subtree, bufsize: int, log: SyncLog | None, reporter: Reporter) -> None:
        ctx = mp.get_context("fork")
        self.tasks: Any = ctx.SimpleQueue()
        self.out: Any = ctx.SimpleQueue()
        self.reporter = reporter
        self._callbacks: dict[int, Callable[[ShardResult | None], None]] = {}
        self._next = 0
        self._procs = [ctx.Process(target=_worker, daemon=True, name=f"dv-sync-worker{i}",
                                   args=(subtree, bufsize, log.path if log else None, self.tasks, self.out))
                       for i in range(n)]
        with signals_held():
            for p in self._procs:
                p.start()
        self._alive = n
        self._gone: set[int] = set()  # workers whose end the collector has counted, by pid
        self._failed: BaseException | None = None  # the first error of a callback
        self._collector = threading.Thread(target=self._collect, name="dv-sync-collect", daemon=True)
        self._collector.start()

    def submit(self, relpath: bytes, fresh: bool, included: bool, expect: tuple[Identity, Identity],
               seen: list[Identity], done: Callable[[ShardResult | None], None]) -> None:
        """``expect``: the (source, destination) directories the worker must find there;
        ``seen``: the source directories above (see engine.Syncer.run_subtree)."""
        tid = self._next
        self._next += 1
        self._callbacks[tid] = done
        self.tasks.put((tid, (relpath, fresh, included, expect, seen)))

    def _collect(self) -> None:
        while self._alive:
            msg = self.out.get()
            if msg[0] == "a":
                self.reporter.advance(nbytes=msg[1], items=msg[2], current=msg[3])
            elif msg[0] == "p":
                self.reporter.problem(msg[1], msg[2], msg[3])
            elif msg[0] == "r":
                try:
                    self._callbacks.pop(msg[1])(msg[2])
                except BaseException as exc:
                    # Raised by close. The queue is still read to the end: unread, it fills
                    # and the workers block on it; and before, the error was lost.
                    self._failed = self._failed or exc
            elif msg[1] not in self._gone:  # a worker's end, said by it or for it (close)
                self._gone.add(msg[1])
                self._alive -= 1

    def close(self) -> None:
        """Wait for every subtree handed out (after a cancel, workers skip what is left)."""
        for _ in self._procs:
            self.tasks.put(None)
        mourned: set[int] = set()
        while self._collector.is_alive():
            self._collector.join(0.2)  # a timed wait stays interruptible
            # A worker killed (the OOM killer) never says it ended, and the collector waited
            # for it forever: the sync hung (test_shards_threads.py). Said for it here.
            for p in self._procs:
                if p.exitcode not in (None, 0) and p.pid is not None and p.pid not in mourned:
                    mourned.add(p.pid)
                    self.out.put(("x", p.pid))
        for p in self._procs:
            p.join()
        # Lost with a worker that died, or never started after a cancel. A callback may
        # register another (close runs again from an interrupt handler), so drain, not iterate.
        while self._callbacks:
            _tid, done = self._callbacks.popitem()
            done(None)
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed


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
                run.out.problem(d.relpath, "write", "the worker process syncing it died")
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
