"""Bandwidth limits (``--limit-upload``, ``--limit-download``): a token bucket, and a
backend wrapper that holds each transfer to it. The rate is an average: a transfer waits
until the bucket has paid for it, so over any stretch of seconds no more than the rate
goes through (a single 32 MiB pack still travels at the link's speed, then the next waits)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from deltavault.backends.base import Backend, Forwarding, put_file


class TokenBucket:
    """``rate`` bytes a second, with at most ``burst`` seconds of credit saved up. Thread-safe:
    concurrent transfers share one budget."""

    def __init__(self, rate: int, *, burst: float = 0.5, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = rate * burst
        self.clock, self.sleep = clock, sleep
        self._tokens = self.capacity
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Account for ``n`` bytes, waiting as long as they take at the rate."""
        with self._lock:
            now = self.clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self.sleep(wait)


class ThrottledBackend(Forwarding):
    def __init__(self, inner: Backend, *, upload: TokenBucket | None = None,
                 download: TokenBucket | None = None) -> None:
        super().__init__(inner)
        self.upload, self.download = upload, download

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(name, offset, length)
        if self.download is not None:
            self.download.take(len(data))
        return data

    def put(self, name: str, data: bytes) -> None:
        if self.upload is not None:
            self.upload.take(len(data))
        self.inner.put(name, data)

    def put_file(self, name: str, fd: int, size: int) -> None:
        if self.upload is not None:
            self.upload.take(size)
        put_file(self.inner, name, fd, size)


def limited(backend: Backend, upload: int | None, download: int | None) -> Backend:
    """``backend`` held to ``upload`` and ``download`` bytes a second (None: no limit)."""
    if not upload and not download:
        return backend
    return ThrottledBackend(backend, upload=TokenBucket(upload) if upload else None,
                           download=TokenBucket(download) if download else None)
