"""Storage backends. Import nothing from higher layers here."""

from __future__ import annotations

from deltavault.backends.base import Backend, ObjectInfo
from deltavault.backends.local import LocalBackend
from deltavault.backends.retry import RetryingBackend
from deltavault.backends.s3location import S3Options
from deltavault.errors import UsageError


def open_backend(url: str, *, s3: S3Options | None = None) -> Backend:
    """Map a repository location to a backend. Plain paths and ``local:PATH`` are local.
    ``s3``: connection options of an ``s3:`` location (default: from the environment)."""
    if url.startswith("s3:"):
        from deltavault.backends.readahead import ReadAheadBackend
        from deltavault.backends.s3 import S3Backend
        from deltavault.backends.s3location import parse_location as parse_s3

        # Throttling (503 SlowDown) comes in bursts of seconds: more attempts than for a
        # disk, about 13 s of backoff in all before the error is reported. Read-ahead
        # turns a restore's many small ranged reads into a few large GETs.
        return ReadAheadBackend(RetryingBackend(S3Backend(parse_s3(url), s3 or S3Options.from_env()),
                                                attempts=7, base_delay=0.2, max_delay=10.0))
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
    raise UsageError(f"unsupported repository location {url!r}: use a local path, "
                     "sftp://[user@]host[:port]/path or s3:https://host[:port]/bucket[/prefix]")


__all__ = ["Backend", "LocalBackend", "ObjectInfo", "RetryingBackend", "open_backend"]
