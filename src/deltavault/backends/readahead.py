"""Read-ahead for object stores: runs of forward ranged reads of one pack become a few large
GETs.

A restore reads a pack's blobs in order, a few hundred KiB at a time; on S3 each read is a
request with its own latency and cost. A read near the start of a pack (where a scan begins),
or one that starts at or shortly after where the previous read of the same pack ended,
fetches ``window`` bytes from there, and later reads inside that window come from memory.
Any other read (a pack header at the end, a single blob) is passed on as it is. At most ``windows`` windows are kept (least recently used first
out), so memory stays bounded. Packs never change; a put or delete of a name drops its
windows anyway.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

from deltavault.backends.base import Backend, ObjectInfo


class ReadAheadBackend:
    HEAD = 1024 * 1024  # a first read this close to the start of a pack begins a scan
    def __init__(self, inner: Backend, *, window: int = 16 * 1024 * 1024, windows: int = 6,
                 prefix: str = "data/") -> None:
        self.inner = inner
        self.window = window
        self.windows = windows
        self.prefix = prefix
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._last: OrderedDict[str, int] = OrderedDict()  # name -> end of its previous read

    def location(self) -> str:
        return self.inner.location()

    def exists(self) -> bool:
        return self.inner.exists()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def stat(self, name: str) -> ObjectInfo:
        return self.inner.stat(name)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if length is None or offset < 0 or length >= self.window or not name.startswith(self.prefix):
            return self.inner.get(name, offset, length)
        with self._lock:
            for (n, start), data in self._cache.items():
                if n == name and start <= offset and offset + length <= start + len(data):
                    self._cache.move_to_end((n, start))
                    return data[offset - start: offset - start + length]
            prev = self._last.pop(name, None)
            self._last[name] = offset + length
            if len(self._last) > 4096:
                self._last.popitem(last=False)
        near = offset < self.HEAD if prev is None else 0 <= offset - prev <= self.window
        if not near:
            return self.inner.get(name, offset, length)  # not (yet) a forward run
        data = self.inner.get(name, offset, self.window)
        with self._lock:
            self._cache[(name, offset)] = data
            while len(self._cache) > self.windows:
                self._cache.popitem(last=False)
        return data[:length]

    def _forget(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == name]:
                del self._cache[key]
            self._last.pop(name, None)

    def put(self, name: str, data: bytes) -> None:
        self._forget(name)
        self.inner.put(name, data)

    def delete(self, name: str) -> None:
        self._forget(name)
        self.inner.delete(name)
