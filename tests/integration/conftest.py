"""Fixtures of the S3 tests: a fresh bucket in the session's SeaweedFS, the counting and
misbehaving proxy before it, the CLI on a repository there, and a backend on one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deltavault.backends.s3 import S3Backend
from deltavault.backends.s3location import S3Location, S3Options
from tests.conftest import Cli
from tests.s3proxy import Proxy, proxy
from tests.seaweed import Seaweed


@pytest.fixture
def bucket(seaweed: Seaweed) -> str:
    return seaweed.new_bucket()


@pytest.fixture
def s3proxy(seaweed: Seaweed) -> Iterator[Proxy]:
    with proxy(seaweed.s3_port) as p:
        yield p


@pytest.fixture
def scli(cli: Cli, seaweed: Seaweed, s3proxy: Proxy, bucket: str) -> Cli:
    """The CLI on a repository in a fresh bucket, through the proxy."""
    cli.env.update(seaweed.env(), DELTAVAULT_REPOSITORY=s3proxy.url(bucket, "repo"))
    return cli


@pytest.fixture
def store(seaweed: Seaweed, s3proxy: Proxy, s3env: dict[str, str]) -> S3Backend:
    """A backend on a fresh bucket through the proxy, with two objects stored."""
    bucket = seaweed.new_bucket()
    b = S3Backend(S3Location(bucket, "repo", s3proxy.endpoint), S3Options(read_timeout=2, connect_timeout=2))
    b.put("index/" + "a" * 64, b"first")
    b.put("index/" + "b" * 64, b"second")
    return b
