"""A backend wrapper that misbehaves on purpose, for fault and crash tests.

``FaultyBackend(inner, faults)`` passes every call to ``inner`` and applies the first
matching ``Fault`` around it:

- ``error``, ``nospace``, ``notfound``: raise the typed exception (retryable or not) instead
  of, or after, the call;
- ``delay``: sleep first (a slow or distant store);
- ``torn``: a put stores only the first half of the data under the real name (a store that
  breaks atomicity: what is stored above must notice);
- ``partial``: a put leaves half the data under a temporary name, as a writer killed in the
  middle leaves it, and raises;
- ``crash``: SIGKILL this process before, after, or in the middle of (``partial`` first) the
  call: a real crash, not an exception;
- a callable: called with the object name (for example to cut network sessions).

``eventual`` (seconds) makes listings lag like an eventually consistent object store: a new
object is not listed for that long, and a deleted one is still listed.
Every call is recorded in ``calls`` as (operation, name).
"""

from __future__ import annotations

import builtins
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from deltavault.backends.base import Backend, ObjectInfo, put_file, read_fd, temp_name
from deltavault.errors import BackendError, NoSpace, ObjectNotFound

OPS = ("exists", "list", "get", "put", "delete", "stat")
T = TypeVar("T")


@dataclass
class Fault:
    ops: tuple[str, ...] = ("put",)  # which operations it applies to
    action: str | Callable[[str], None] = "error"  # error | nospace | notfound | delay | torn | partial | crash
    when: str = "before"  # before | after | mid (crash and partial: a half-written temp object)
    prefix: str = ""  # only names starting with this
    skip: str = ""  # never names starting with this (e.g. "locks/")
    nth: int = 0  # fire at the nth matching call (1-based); 0: at every matching call
    probability: float = 1.0  # with nth=0: the share of matching calls it fires at
    times: int = 0  # stop after firing this many times (0: no limit)
    retryable: bool = True
    delay: float = 0.0
    message: str = "injected fault"
    seen: int = 0
    fired: int = 0

    def matches(self, op: str, name: str, rng: random.Random) -> bool:
        if op not in self.ops or not name.startswith(self.prefix) or (self.skip and name.startswith(self.skip)):
            return False
        self.seen += 1
        if self.times and self.fired >= self.times:
            return False
        hit = self.seen == self.nth if self.nth else rng.random() < self.probability
        if hit:
            self.fired += 1
        return hit


class FaultyBackend:
    def __init__(self, inner: Backend, faults: list[Fault] | None = None, *, eventual: float = 0.0,
                 seed: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.faults = list(faults or [])
        self.eventual = eventual
        self.calls: list[tuple[str, str]] = []
        self._rng = random.Random(seed)
        self._clock = clock
        self._lock = threading.Lock()
        self._new: dict[str, float] = {}  # name -> when it was put (eventual listing)
        self._gone: dict[str, tuple[float, int]] = {}  # name -> (when deleted, size)

    # ------------------------------------------------------------------ the contract
    def location(self) -> str:
        return self.inner.location()

    def exists(self) -> bool:
        return bool(self._around("exists", "", self.inner.exists))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        items = self._around("list", prefix, lambda: list(self.inner.list(prefix))) or []
        return iter(self._lagging(prefix, items) if self.eventual else items)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._around("get", name, lambda: self.inner.get(name, offset, length)) or b""

    def put(self, name: str, data: bytes) -> None:
        self._put(name, lambda: self.inner.put(name, data), lambda: data)

    def put_file(self, name: str, fd: int, size: int) -> None:
        """A put from a file (a spooled pack), passed on as one, so the inner backend's own
        streaming path is what runs; faults apply as to ``put`` (op "put")."""
        self._put(name, lambda: put_file(self.inner, name, fd, size), lambda: read_fd(fd, size))

    def _put(self, name: str, call: Callable[[], None], data: Callable[[], bytes]) -> None:
        self._around("put", name, call, data)
        if self.eventual:
            with self._lock:
                self._new[name] = self._clock()
                self._gone.pop(name, None)

    def delete(self, name: str) -> None:
        size = -1
        if self.eventual:
            try:
                size = self.inner.stat(name).size
            except ObjectNotFound:
                size = -1
        self._around("delete", name, lambda: self.inner.delete(name))
        if self.eventual and size >= 0:
            with self._lock:
                self._gone[name] = (self._clock(), size)
                self._new.pop(name, None)

    def stat(self, name: str) -> ObjectInfo:
        info = self._around("stat", name, lambda: self.inner.stat(name))
        assert info is not None
        return info

    # ------------------------------------------------------------------ faults
    def _around(self, op: str, name: str, call: Callable[[], T],
                data: Callable[[], bytes] | None = None) -> T | None:
        with self._lock:
            self.calls.append((op, name))
            fault = next((f for f in self.faults if f.matches(op, name, self._rng)), None)
        if fault is None:
            return call()
        if fault.action == "torn":  # the torn object stands instead of the real one
            if data is None:
                raise ValueError("a torn write needs a put")
            whole = data()
            self.inner.put(name, whole[: len(whole) // 2])
            return None
        if fault.when in ("before", "mid"):
            self._fire(fault, name, data)
        result = call()
        if fault.when == "after":
            self._fire(fault, name, data)
        return result

    def _fire(self, fault: Fault, name: str, data: Callable[[], bytes] | None) -> None:
        action = fault.action
        if callable(action):
            action(name)
        elif action == "delay":
            time.sleep(fault.delay)
        elif action == "error":
            raise BackendError(f"{name}: {fault.message}", retryable=fault.retryable)
        elif action == "nospace":
            raise NoSpace(f"{name}: {fault.message} (no space)")
        elif action == "notfound":
            raise ObjectNotFound(f"{name}: {fault.message} (not found)")
        elif action in ("partial", "crash"):
            if (action == "partial" or fault.when == "mid") and data is not None:
                folder, _, base = name.rpartition("/")
                whole = data()
                self.inner.put(f"{folder}/{temp_name(base)}" if folder else temp_name(base), whole[: len(whole) // 2])
            if action == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            raise BackendError(f"{name}: {fault.message} (interrupted write)", retryable=fault.retryable)
        else:
            raise ValueError(f"unknown fault action {action!r}")

    # ------------------------------------------------------------------ eventual listing
    def _lagging(self, prefix: str, items: builtins.list[ObjectInfo]) -> builtins.list[ObjectInfo]:
        now = self._clock()
        with self._lock:
            hidden = {n for n, t in self._new.items() if now - t < self.eventual}
            ghosts = [ObjectInfo(n, size) for n, (t, size) in self._gone.items()
                      if now - t < self.eventual and n.startswith(prefix)]
        return [o for o in items if o.name not in hidden] + ghosts
