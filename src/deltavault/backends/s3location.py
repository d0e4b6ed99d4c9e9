"""Where an S3 repository lives and how to reach it: locations and connection options.

Locations:

- ``s3:http[s]://host[:port]/bucket[/prefix]``: any S3-compatible store (SeaweedFS, MinIO,
  Ceph RGW, Garage, Backblaze B2, Wasabi, ...) at that endpoint;
- ``s3:bucket[/prefix]`` (or ``s3://bucket[/prefix]``): AWS S3, the region from the usual
  AWS configuration (AWS_REGION, AWS_DEFAULT_REGION, the profile's ``region``).

Credentials are not part of a location: they come from the standard AWS chain (environment,
shared credentials and config files, AWS_PROFILE, container and instance roles).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from deltavault.errors import UsageError

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
ADDRESSING = ("auto", "path", "virtual")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""  # no leading or trailing '/'
    endpoint: str | None = None  # scheme://host[:port]; None: AWS

    def __str__(self) -> str:
        tail = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return f"s3:{self.endpoint}/{tail}" if self.endpoint else f"s3:{tail}"

    @property
    def root(self) -> str:
        """The key prefix of every object of the repository."""
        return f"{self.prefix}/" if self.prefix else ""


def parse_location(url: str) -> S3Location:
    if url.startswith("s3://"):
        rest, endpoint = url[len("s3://"):], None
    elif url.startswith("s3:"):
        rest, endpoint = url[len("s3:"):], None
        m = re.match(r"^(https?)://([^/]+)(/.*)?$", rest)
        if m:
            endpoint = f"{m.group(1)}://{m.group(2)}"
            rest = (m.group(3) or "").lstrip("/")
        elif "://" in rest:
            raise UsageError(f"{url!r}: the endpoint must be http:// or https://")
    else:
        raise UsageError(f"{url!r} is not an s3 location")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    example = "s3:https://host[:port]/bucket[/prefix] or s3:bucket[/prefix] (AWS)"
    if not bucket:
        raise UsageError(f"{url!r}: no bucket; use {example}")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise UsageError(f"{url!r}: {bucket!r} is not a valid bucket name (3-63 characters: "
                         "lower-case letters, digits, '.' and '-')")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise UsageError(f"{url!r}: the prefix {prefix!r} has an empty, '.' or '..' component")
    return S3Location(bucket, prefix, endpoint)


@dataclass(frozen=True)
class S3Options:
    """How to talk to the store. Every field has an environment variable, so a repository
    in DELTAVAULT_REPOSITORY needs no command-line options."""

    ca_bundle: str | None = None  # PEM file of the CAs to trust (a private CA); else AWS_CA_BUNDLE or the system's
    addressing: str = "auto"  # path | virtual | auto (path for an endpoint, virtual on AWS)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # per socket read, so a stalled transfer fails instead of hanging
    part_size: int = 16 * 1024 * 1024  # multipart upload part size
    # Objects from this size go up in parts. Above the default pack size (32 MiB): one PUT
    # per pack is 6 times fewer requests than parts, and measured as fast here.
    multipart_threshold: int = 64 * 1024 * 1024
    parallel_parts: int = 4  # parts in flight per object (memory: this many part copies)

    @classmethod
    def from_env(cls, *, ca_bundle: str | None = None, addressing: str | None = None,
                 timeout: float | None = None) -> S3Options:
        env = os.environ
        addressing = addressing or env.get("DELTAVAULT_S3_ADDRESSING") or "auto"
        if addressing not in ADDRESSING:
            raise UsageError(f"S3 addressing {addressing!r}: use one of {', '.join(ADDRESSING)}")
        ca = ca_bundle or env.get("DELTAVAULT_S3_CA_BUNDLE") or None
        if ca is not None and not os.path.isfile(ca):
            raise UsageError(f"the S3 CA bundle {ca} does not exist or is not a file")
        t = timeout if timeout is not None else _float_env("DELTAVAULT_S3_TIMEOUT", 60.0)
        return cls(ca_bundle=ca, addressing=addressing, read_timeout=t,
                   connect_timeout=min(10.0, t),
                   part_size=_size_env("DELTAVAULT_S3_PART_SIZE", cls.part_size),
                   multipart_threshold=_size_env("DELTAVAULT_S3_MULTIPART_THRESHOLD", cls.multipart_threshold),
                   parallel_parts=int(_float_env("DELTAVAULT_S3_PARALLEL_PARTS", cls.parallel_parts)))


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number") from None
    if v <= 0:
        raise UsageError(f"{name} must be positive")
    return v


def _size_env(name: str, default: int) -> int:
    v = int(_float_env(name, default))
    if v < 5 * 1024 * 1024:
        raise UsageError(f"{name}: S3 parts are at least 5 MiB")
    return v
