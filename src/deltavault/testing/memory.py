"""An object store in memory, for tests: the backend contract with nothing in the way."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from deltavault.backends.base import TEMP_PREFIX, ObjectInfo, check_object_name
from deltavault.errors import ObjectNotFound


class MemoryBackend:
    """Thread-safe; a put replaces the whole object at once, as the contract asks."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def location(self) -> str:
        return f"memory:{self.name}"

    def exists(self) -> bool:
        with self._lock:
            return bool(self.objects)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_object_name(prefix or ".")
        with self._lock:
            items = sorted(self.objects.items())
        for name, data in items:
            if name.startswith(prefix) and not name.rpartition("/")[2].startswith(TEMP_PREFIX):
                yield ObjectInfo(name, len(data))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self._data(name)
        if offset < 0:
            if -offset > len(data):
                raise ObjectNotFound(f"{name}: shorter than {-offset} bytes")
            offset += len(data)
        return data[offset:] if length is None else data[offset:offset + length]

    def put(self, name: str, data: bytes) -> None:
        check_object_name(name)
        with self._lock:
            self.objects[name] = bytes(data)

    def delete(self, name: str) -> None:
        check_object_name(name)
        with self._lock:
            self.objects.pop(name, None)

    def stat(self, name: str) -> ObjectInfo:
        return ObjectInfo(name, len(self._data(name)))

    def _data(self, name: str) -> bytes:
        check_object_name(name)
        with self._lock:
            data = self.objects.get(name)
        if data is None:
            raise ObjectNotFound(f"{name}: not found")
        return data
