"""Fixtures of the S3 tests: a fresh bucket in the session's SeaweedFS, the counting and
misbehaving proxy before it, and the CLI on a repository there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
