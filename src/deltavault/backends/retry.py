"""Retry wrapper: transient backend failures are retried with capped exponential backoff
and jitter (many clients throttled at once must not come back in lockstep)."""

from __future__ import annotations

import mmap
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from deltavault.backends.base import Backend, ObjectInfo, get_sized, put_file
from deltavault.errors import BackendError

T = TypeVar("T")


class RetryingBackend:
    def __init__(self, inner: Backend, *, attempts: int = 5, base_delay: float = 0.2,
                 max_delay: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> None:
        self.inner = inner
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep

    def _call(self, fn: Callable[[], T]) -> T:
        delay = self.base_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except BackendError as exc:
                if not exc.retryable or attempt == self.attempts:
                    raise
                self._sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.max_delay)
        raise AssertionError("unreachable")

    def location(self) -> str:
        return self.inner.location()

    def exists(self) -> bool:
        return self._call(self.inner.exists)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return iter(self._call(lambda: list(self.inner.list(prefix))))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call(lambda: self.inner.get(name, offset, length))

    def get_sized(self, name: str, offset: int, length: int, reserve: Callable[[int], None]) -> bytes | mmap.mmap:
        return self._call(lambda: get_sized(self.inner, name, offset, length, reserve))

    def put(self, name: str, data: bytes) -> None:
        self._call(lambda: self.inner.put(name, data))

    def put_file(self, name: str, fd: int, size: int) -> None:
        self._call(lambda: put_file(self.inner, name, fd, size))

    def delete(self, name: str) -> None:
        self._call(lambda: self.inner.delete(name))

    def stat(self, name: str) -> ObjectInfo:
        return self._call(lambda: self.inner.stat(name))
