"""Storage backends. Import nothing from higher layers here."""

from __future__ import annotations

from deltavault.backends.base import Backend, ObjectInfo
from deltavault.backends.local import LocalBackend
from deltavault.backends.retry import RetryingBackend
from deltavault.errors import UsageError


def open_backend(url: str) -> Backend:
    """Map a repository location to a backend. Plain paths and ``local:PATH`` are local."""
    if url.startswith("local:"):
        url = url[len("local:"):]
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("", "file"):
        path = url.split("://", 1)[1] if scheme else url
        return RetryingBackend(LocalBackend(path))
    if scheme == "sftp" or url.startswith("sftp:"):
        from deltavault.backends.sftp import SFTPBackend
        from deltavault.backends.ssh import parse_location
        return RetryingBackend(SFTPBackend(parse_location(url)))
    raise UsageError(f"unsupported repository location {url!r}: use a local path or sftp://[user@]host[:port]/path")


__all__ = ["Backend", "LocalBackend", "ObjectInfo", "RetryingBackend", "open_backend"]
