"""Bounds on work handed to threads.

``BoundedPool`` admits only so many jobs at a time: the tree walkers of restore and sync
feed it, so a walker waits instead of queueing a whole tree's work and holding open every
directory that work needs. ``Inflight`` bounds the bytes queued for a pool: file and volume
backup hand it chunks, so memory stays bounded however fast the reader is.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# A backup's budget for data in flight (``--buffer-memory``, DELTAVAULT_BUFFER_MEMORY): file
# chunks queued for the workers and the read windows they are views of, or a volume's block
# buffers. With packs spooled to disk (repository/pack.py) this is the part of a backup's
# memory that grows with the data rate; docs/benchmarks.md (Memory) measures it.
DEFAULT_BUFFER_MEMORY = 8 * 1024 * 1024


class BoundedPool:
    def __init__(self, workers: int, in_flight: int, name: str) -> None:
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(in_flight)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Blocks while ``in_flight`` jobs are queued or running; a slot is freed when a job
        ends, fails or is cancelled."""
        self._slots.acquire()
        try:
            fut = self._pool.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _f: self._slots.release())
        return fut

    def shutdown(self, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel_futures)


class Inflight:
    """Bounds the bytes queued for the worker pool."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


# Signals that end a run: a fork must not take one in its at-fork callbacks, where Python
# reports the KeyboardInterrupt as "ignored" and the run goes on as if none had come.
RUN_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold the run's signals in this thread for the block (a fork); one that arrives
    meanwhile is delivered when it ends. A forked child starts with them held: it calls
    ``release_signals`` once its own handlers are set."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, RUN_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def release_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RUN_SIGNALS)
