"""Subtrees synced by worker processes.

A tree of small files costs a dozen short system calls per file. In one Python process the
GIL serialises them (threads hand the GIL over at every call, which costs more than it
saves), so the walk is split: the main process walks the top levels and hands whole
subtrees to forked workers, each running its own Syncer. Workers report progress through a
queue, append to the same log (one write per line, O_APPEND), share one cancel event, and
return their counters, problems and hard-link groups; the main process links hard links
that span subtrees once all are done.
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

from deltavault.fs.dirfd import Identity
from deltavault.progress import Reporter
from deltavault.sync.data import BufferPool
from deltavault.sync.guard import Guard
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.remove import join
from deltavault.sync.report import SyncLog, SyncProblem, SyncStats


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
    targets: dict[bytes, tuple[Identity, bool]] = field(default_factory=dict)  # Syncer.targets
    dir_ids: dict[bytes, Identity] = field(default_factory=dict)  # Syncer.dir_ids


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


def _worker(src: bytes, dst: bytes, opts: SyncOptions, log_path: str | None, cancel: Any,
            tasks: Any, out: Any, roots: tuple[int, int], guard: Guard | None) -> None:
    from deltavault.sync.local.engine import Syncer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides; it sets `cancel`
    _die_with_parent()
    log = SyncLog(log_path) if log_path else None
    buffers = BufferPool(max(4096, -(-opts.bufsize // 4096) * 4096))  # one per worker, not per subtree
    while True:
        task = tasks.get()
        if task is None:
            break
        tid, relpath, fresh, included, expect, seen = task
        rep = QueueReporter(out)
        # The roots are the parent's, inherited through fork: the same directories it
        # checked, never looked up again by path.
        s = Syncer(src, dst, opts, rep, log, cancel=cancel, processes=1, buffers=buffers, roots=roots, guard=guard)
        try:
            kept = s.run_subtree(relpath, fresh=fresh, included=included, expect=expect, seen=seen)
            fatal = None
        except Exception as exc:  # NoSpace, or a bug: the main process reports it
            kept, fatal = 1, f"{type(exc).__name__}: {exc}"
        rep.finish()
        out.put(("r", tid, ShardResult(s.stats, s.problems, s.stopped, fatal, kept, s.hardlink_groups(),
                                   s.link_copies, s.links_made, s.targets, s.dir_ids)))
    out.put(("x", os.getpid()))


class ShardPool:
    """Forked worker processes taking subtrees from a queue. Forked at once, while the
    caller still has a single thread."""

    def __init__(self, n: int, src: bytes, dst: bytes, opts: SyncOptions, log: SyncLog | None,
                 cancel: Any, reporter: Reporter, roots: tuple[int, int], guard: Guard | None) -> None:
        ctx = mp.get_context("fork")
        self.tasks: Any = ctx.SimpleQueue()
        self.out: Any = ctx.SimpleQueue()
        self.reporter = reporter
        self._callbacks: dict[int, Callable[[ShardResult | None], None]] = {}
        self._next = 0
        self._procs = [ctx.Process(target=_worker, daemon=True, name=f"dv-sync-worker{i}",
                                   args=(src, dst, opts, log.path if log else None, cancel, self.tasks, self.out,
                                         roots, guard))
                       for i in range(n)]
        for p in self._procs:
            p.start()
        self._alive = n
        self._collector = threading.Thread(target=self._collect, name="dv-sync-collect", daemon=True)
        self._collector.start()

    def submit(self, relpath: bytes, fresh: bool, included: bool, expect: tuple[Identity, Identity],
               seen: list[Identity], done: Callable[[ShardResult | None], None]) -> None:
        """``expect``: the (source, destination) directories the worker must find there;
        ``seen``: the source directories above (see Syncer.run_subtree)."""
        tid = self._next
        self._next += 1
        self._callbacks[tid] = done
        self.tasks.put((tid, relpath, fresh, included, expect, seen))

    def _collect(self) -> None:
        while self._alive:
            msg = self.out.get()
            if msg[0] == "a":
                self.reporter.advance(nbytes=msg[1], items=msg[2], current=msg[3])
            elif msg[0] == "p":
                self.reporter.problem(msg[1], msg[2], msg[3])
            elif msg[0] == "r":
                self._callbacks.pop(msg[1])(msg[2])
            else:
                self._alive -= 1

    def close(self) -> None:
        """Wait for every subtree handed out (after a cancel, workers skip what is left)."""
        for _ in self._procs:
            self.tasks.put(None)
        while self._collector.is_alive():
            self._collector.join(0.2)  # a timed wait stays interruptible
        for p in self._procs:
            p.join()
        # Lost with a worker that died, or never started after a cancel. A callback may
        # register another (close runs again from an interrupt handler), so drain, not iterate.
        while self._callbacks:
            _tid, done = self._callbacks.popitem()
            done(None)


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
