"""The worker processes that sync subtrees (local/shards.py), and how they talk to the main
process: each worker has a pipe of its own each way, and the main process hands a subtree
to a worker that is free.

Nothing is shared that a dying worker could leave held. With one task queue and one result
queue for all (multiprocessing queues, each guarded by a lock shared between processes), a
worker killed (SIGKILL, the OOM killer) while it held a queue's lock (waiting for its next
task, or half way through sending a result) held it for good: the other workers and the
main process waited on it forever, and the sync hung. A worker's own pipe dies with it: the
main process reads the end of it (a message cut short included), fails that worker's
subtree (reported, exit 3) and gives the subtrees still to come to the others. The cancel
flag is a byte of shared memory, read and written without a lock (a multiprocessing Event
takes one on every ``is_set``).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from deltavault.fs.dirfd import Identity
from deltavault.progress import Reporter
from deltavault.sync.data import BufferPool
from deltavault.sync.report import SyncLog, SyncProblem, SyncStats
from deltavault.workers import release_signals, signals_held

Task = tuple[bytes, bool, bool, tuple[Identity, Identity], list[Identity]]  # relpath, fresh, included, expect, seen


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


# Syncs one subtree in a worker process: (task, its reporter, the worker's buffers, log).
Subtree = Callable[[Task, Reporter, BufferPool, "SyncLog | None"], ShardResult]

# A test's hook (tests/integration/sync/test_sync_workers.py), "take:RELPATH" or
# "send:RELPATH": the worker handed the subtree RELPATH SIGKILLs itself as soon as it has it
# (where a shared task queue's lock was held), or once it synced it, half way through
# sending its result (where a shared result queue's lock was held).
DIE_ENV = "DELTAVAULT_TEST_SYNC_WORKER_DIE"


class SharedFlag:
    """A cancel flag the main process and its forked workers share: ``set`` and ``is_set``
    as an Event has them, without a lock."""

    def __init__(self) -> None:
        self._v = mp.get_context("fork").RawValue(ctypes.c_ubyte, 0)

    def set(self) -> None:
        self._v.value = 1

    def is_set(self) -> bool:
        return bool(self._v.value)


class PipeReporter:
    """A worker's Reporter: problems at once, progress summed and sent a few times a second."""

    wants_totals = False

    def __init__(self, out: Connection) -> None:
        self.out = out
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
            self.out.send(("a", self._bytes, self._items, current))
            self._bytes = self._items = 0

    def problem(self, path: str, kind: str, message: str) -> None:
        self.out.send(("p", path, kind, message))

    def finish(self) -> None:
        self.flush()


def _die_with_parent() -> None:
    """A worker must not outlive the main process (it would hold DST files open)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(subtree: Subtree, bufsize: int, log_path: str | None, tasks: Connection, out: Connection,
            others: list[Connection]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides; it sets the cancel flag
    release_signals()  # held while it was forked (workers.signals_held)
    _die_with_parent()
    for c in others:  # the main process's ends (held here, a pipe's end would never be seen)
        c.close()
    when, _, die = os.environ.get(DIE_ENV, "").partition(":")
    log = SyncLog(log_path) if log_path else None
    buffers = BufferPool(max(4096, -(-bufsize // 4096) * 4096))  # one per worker, not per subtree
    while (task := tasks.recv()) is not None:
        tid, job = task
        doomed = bool(die) and job[0] == os.fsencode(die)
        if doomed and when == "take":
            os.kill(os.getpid(), signal.SIGKILL)
        rep = PipeReporter(out)
        result = subtree(job, rep, buffers, log)
        rep.finish()
        if doomed:
            os.write(out.fileno(), struct.pack("!i", 1 << 20) + b"half a result")
            os.kill(os.getpid(), signal.SIGKILL)
        out.send(("r", tid, result))


@dataclass
class _Worker:
    proc: Any
    tasks: Connection  # the main process's ends
    out: Connection
    current: int | None = None  # the task it is syncing
    stopped: bool = False  # told to end (sent None)
    gone: bool = False  # ended, or its pipe broke


class ShardPool:
    """Forked worker processes syncing the subtrees handed to them, one at a time each.
    Forked at once, while the caller still has a single thread."""

    def __init__(self, n: int, subtree: Subtree, bufsize: int, log: SyncLog | None, reporter: Reporter) -> None:
        ctx = mp.get_context("fork")
        self.reporter = reporter
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[ShardResult | None], None]] = {}
        self._pending: deque[tuple[int, Task]] = deque()
        self._closing = False
        self._next = 0
        self._workers: list[_Worker] = []
        held: list[Connection] = []
        with signals_held():
            for i in range(n):
                task_r, task_w = ctx.Pipe(duplex=False)
                out_r, out_w = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker, daemon=True, name=f"dv-sync-worker{i}",
                                args=(subtree, bufsize, log.path if log else None, task_r, out_w,
                                      [*held, task_w, out_r]))
                p.start()
                task_r.close()  # the worker's ends: its death ends them
                out_w.close()
                self._workers.append(_Worker(p, task_w, out_r))
                held = [*held, task_w, out_r]
        self._failed: BaseException | None = None  # the first error of a callback
        self._collector = threading.Thread(target=self._collect, name="dv-sync-collect", daemon=True)
        self._collector.start()

    def submit(self, relpath: bytes, fresh: bool, included: bool, expect: tuple[Any, Any],
               seen: list[Any], done: Callable[[ShardResult | None], None]) -> None:
        """``expect``: the (source, destination) directories the worker must find there;
        ``seen``: the source directories above (see engine.Syncer.run_subtree)."""
        with self._lock:
            tid = self._next
            self._next += 1
            self._callbacks[tid] = done
            self._pending.append((tid, (relpath, fresh, included, expect, seen)))
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand the next subtrees to free workers; once closing and none are left, tell them
        to end. Under ``_lock``."""
        for w in self._workers:
            if w.gone or w.stopped or w.current is not None:
                continue
            if not self._pending and not self._closing:
                return
            task = self._pending.popleft() if self._pending else None
            try:
                w.tasks.send(task)
            except OSError:  # dead: the collector reads the end of its pipe
                w.gone = True
                if task is not None:
                    self._pending.appendleft(task)
                continue
            if task is None:
                w.stopped = True
            else:
                w.current = task[0]

    def _collect(self) -> None:
        while True:
            with self._lock:
                live = {w.out: w for w in self._workers if not w.out.closed}
            if not live:
                return
            for conn in wait(list(live)):
                w = live[conn]  # type: ignore[index]
                try:
                    msg = w.out.recv()
                except (EOFError, OSError):  # it ended (told to, or killed: a message cut short)
                    self._ended(w)
                    continue
                if msg[0] == "a":
                    self.reporter.advance(nbytes=msg[1], items=msg[2], current=msg[3])
                elif msg[0] == "p":
                    self.reporter.problem(msg[1], msg[2], msg[3])
                else:
                    with self._lock:
                        w.current = None
                        done = self._callbacks.pop(msg[1])
                        self._dispatch()
                    self._call(done, msg[2])

    def _ended(self, w: _Worker) -> None:
        """A worker's pipe ended: its subtree, if any, is lost; the others take what is left."""
        w.out.close()
        with self._lock:
            w.gone = True
            lost, w.current = w.current, None
            done = self._callbacks.pop(lost) if lost is not None else None
            orphans: list[Callable[[ShardResult | None], None]] = []
            if all(x.gone for x in self._workers):  # no one left to take the rest
                orphans = [self._callbacks.pop(tid) for tid, _task in self._pending]
                self._pending.clear()
            else:
                self._dispatch()
        for cb in ([done] if done is not None else []) + orphans:
            self._call(cb, None)

    def _call(self, done: Callable[[ShardResult | None], None], result: ShardResult | None) -> None:
        try:
            done(result)
        except BaseException as exc:
            # Raised by close. The pipes are still read to the end: unread, they fill and
            # the workers block on them; and before, the error was lost.
            self._failed = self._failed or exc

    def close(self) -> None:
        """Wait for every subtree handed out (after a cancel, workers skip what is left)."""
        with self._lock:
            self._closing = True
            self._dispatch()
        while self._collector.is_alive():
            self._collector.join(0.2)  # a timed wait stays interruptible
        for w in self._workers:
            w.proc.join()
            w.tasks.close()
        # Lost with a worker that died, or never started after a cancel. A callback may
        # register another (close runs again from an interrupt handler), so drain, not iterate.
        while self._callbacks:
            _tid, done = self._callbacks.popitem()
            done(None)
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed
