"""The storage backend contract: a simple object store.

Names are '/'-separated relative keys such as ``data/ab/ab12...``. Everything above this
layer talks to a :class:`Backend` only, so S3 or SFTP can slot in unchanged.
"""

from __future__ import annotations

import mmap
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable

from deltavault.errors import BackendError

# Objects are written under a temporary name in their folder and renamed when complete.
# Listings skip these names; prune removes old ones (killed writers).
TEMP_PREFIX = ".tmp"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    name: str
    size: int


@runtime_checkable
class Backend(Protocol):
    """All methods raise :class:`deltavault.errors.BackendError` subclasses on failure."""

    def location(self) -> str: ...

    def exists(self) -> bool:
        """True when the repository root exists (not that it holds a repository)."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose names start with ``prefix`` (a folder such as ``index/``)."""
        ...

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read an object, or ``length`` bytes of it from ``offset``. A negative
        ``offset`` counts from the end (for pack trailers)."""
        ...

    def put(self, name: str, data: bytes) -> None:
        """Store atomically: readers see the old object, or none, or all of the new one."""
        ...

    def delete(self, name: str) -> None: ...

    def stat(self, name: str) -> ObjectInfo: ...


class Forwarding:
    """A wrapper's starting point: every call goes to ``inner`` unchanged; a wrapper
    overrides only the calls it changes (throttling, read-ahead)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def location(self) -> str:
        return self.inner.location()

    def exists(self) -> bool:
        return self.inner.exists()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(name, offset, length)

    def put(self, name: str, data: bytes) -> None:
        self.inner.put(name, data)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def stat(self, name: str) -> ObjectInfo:
        return self.inner.stat(name)


def get_sized(backend: Backend, name: str, offset: int, length: int,
              reserve: Callable[[int], None]) -> bytes | mmap.mmap:
    """``backend.get`` that calls ``reserve(n)`` before it holds the ``n`` bytes it returns,
    once the size is known (an S3 response's length, before its body is read), so a caller
    can wait for memory first. A backend that cannot say calls it after the read. ``reserve``
    may be called again on a retry, with the size of that attempt."""
    fn = getattr(backend, "get_sized", None)
    if fn is not None:
        return cast("bytes | mmap.mmap", fn(name, offset, length, reserve))
    data = backend.get(name, offset, length)
    reserve(len(data))
    return data


# Bytes a fallback ``put_file`` reads at a time (it needs the whole object anyway).
_PIECE = 1024 * 1024


def pread_exact(fd: int, n: int, offset: int, size: int) -> bytes:
    """``n`` bytes at ``offset`` of the file open as ``fd``, read again after a short read
    (pread: no shared file position, so threads and retries may read one file at once). The
    file ends before them: an error naming ``size``, the bytes the upload expected."""
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    pieces = [data]
    have = len(data)
    while have < n:
        piece = os.pread(fd, min(_PIECE, n - have), offset + have)
        if not piece:
            raise BackendError(f"source file shorter than {size} bytes", retryable=False)
        pieces.append(piece)
        have += len(piece)
    return b"".join(pieces)


def read_fd(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of the file open as ``fd``."""
    return pread_exact(fd, size, 0, size)


def put_file(backend: object, name: str, fd: int, size: int) -> None:
    """Store the first ``size`` bytes of the file open as ``fd`` as ``name``, atomically like
    ``put``. A backend (or wrapper) with a ``put_file`` method gets the descriptor, and need
    not hold the object in memory; any other gets the bytes, read whole, through ``put``."""
    fn = getattr(backend, "put_file", None)
    if fn is not None:
        fn(name, fd, size)
    else:
        backend.put(name, read_fd(fd, size))  # type: ignore[attr-defined]


def unwrap(backend: object) -> object:
    """The backend under any wrappers (retry, counting), for optional capabilities."""
    while (inner := getattr(backend, "inner", None)) is not None:
        backend = inner
    return backend


def check_object_name(name: str) -> None:
    """Refuse names that would leave the repository root."""
    if name.startswith("/") or ".." in name.split("/"):
        raise BackendError(f"invalid object name {name!r}", retryable=False)


def temp_name(final: str) -> str:
    """A fresh temporary file name for writing the object whose base name is ``final``."""
    return f"{TEMP_PREFIX}-{final}-{secrets.token_hex(6)}"
