"""Counts bytes and requests crossing the backend boundary, for run summaries."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

from deltavault.backends.base import Backend, ObjectInfo, put_file


@dataclass
class Traffic:
    bytes_read: int = 0
    bytes_written: int = 0
    gets: int = 0
    puts: int = 0
    lists: int = 0
    deletes: int = 0
    read_by_kind: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> Traffic:
        return Traffic(self.bytes_read, self.bytes_written, self.gets, self.puts, self.lists,
                       self.deletes, dict(self.read_by_kind))


class CountingBackend:
    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.traffic = Traffic()
        self._lock = threading.Lock()

    def location(self) -> str:
        return self.inner.location()

    def exists(self) -> bool:
        return self.inner.exists()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._lock:
            self.traffic.lists += 1
        return self.inner.list(prefix)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(name, offset, length)
        self._count(name, len(data))
        return data

    def _count(self, name: str, n: int) -> None:
        kind = name.split("/", 1)[0]
        with self._lock:
            self.traffic.gets += 1
            self.traffic.bytes_read += n
            self.traffic.read_by_kind[kind] = self.traffic.read_by_kind.get(kind, 0) + n

    def view(self, name: str, offset: int, length: int) -> memoryview:
        """A read-ahead's ``view`` (backends/readahead.py), else a ``get``; counted as a get."""
        fn = getattr(self.inner, "view", None)
        data = fn(name, offset, length) if fn is not None else memoryview(self.inner.get(name, offset, length))
        self._count(name, len(data))
        return cast(memoryview, data)

    @property
    def reads_ahead(self) -> bool:
        """Whether ``prefetch`` hints reach a backend that reads ahead; BlobReader looks up
        no blob locations for a hint that would go nowhere (a local restore's small-file
        batches: 10k index lookups on the walker's thread)."""
        return hasattr(self.inner, "prefetch")

    def prefetch(self, name: str, offset: int, length: int) -> None:
        """A read-ahead's hint, passed on. Without this the restore's hints stopped here:
        BlobReader found no ``prefetch`` on the repository's counting wrapper."""
        hint = getattr(self.inner, "prefetch", None)
        if hint is not None:
            hint(name, offset, length)

    def hold(self, name: str, offset: int, length: int, *, wait: bool = False,
             ahead: bool = True) -> Callable[[], None]:
        """A read-ahead's hint that pins the pack until released, passed on (a hint that
        goes nowhere holds nothing)."""
        fn = getattr(self.inner, "hold", None)
        if fn is None:
            return lambda: None
        return cast(Callable[[], None], fn(name, offset, length, wait=wait, ahead=ahead))

    def favour(self, name: str) -> None:
        """A read-ahead's hint that a pack holds listings, passed on."""
        fn = getattr(self.inner, "favour", None)
        if fn is not None:
            fn(name)

    def put(self, name: str, data: bytes) -> None:
        self.inner.put(name, data)
        with self._lock:
            self.traffic.puts += 1
            self.traffic.bytes_written += len(data)

    def put_file(self, name: str, fd: int, size: int) -> None:
        put_file(self.inner, name, fd, size)
        with self._lock:
            self.traffic.puts += 1
            self.traffic.bytes_written += size

    def delete(self, name: str) -> None:
        self.inner.delete(name)
        with self._lock:
            self.traffic.deletes += 1

    def stat(self, name: str) -> ObjectInfo:
        return self.inner.stat(name)
