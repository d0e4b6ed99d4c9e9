"""The S3 backend against a store that lies: a real SeaweedFS (tests/seaweed.py) behind the
proxy of tests/s3proxy.py, which rewrites its answers (endless or foreign listings, ranges
answered with the whole object, a 200 carrying an error, a body that stalls, a redirect).
Each must end in a precise error (exit 15, the backend's) or be ignored, never loop, grow
memory, or accept wrong data; the stored objects stay as they were."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deltavault.backends.s3 import S3Backend
from deltavault.backends.s3location import S3Location, S3Options
from deltavault.errors import BackendError, ExitCode
from tests.s3proxy import Exchange, Proxy, Reply, proxy
from tests.seaweed import Seaweed

MiB = 1024 * 1024


@pytest.fixture
def s3proxy(seaweed: Seaweed) -> Iterator[Proxy]:
    with proxy(seaweed.s3_port) as p:
        yield p


@pytest.fixture
def store(seaweed: Seaweed, s3proxy: Proxy, s3env: dict[str, str]) -> S3Backend:
    """A backend on a fresh bucket through the proxy, with two objects stored."""
    bucket = seaweed.new_bucket()
    b = S3Backend(S3Location(bucket, "repo", s3proxy.endpoint), S3Options(read_timeout=2, connect_timeout=2))
    b.put("index/" + "a" * 64, b"first")
    b.put("index/" + "b" * 64, b"second")
    return b


def listing(ex: Exchange) -> bool:
    return ex.method == "GET" and "list-type=2" in ex.target


def test_listing_that_never_ends(store: S3Backend, s3proxy: Proxy) -> None:
    """IsTruncated with the same token, page after page: was an endless loop."""
    def endless(ex: Exchange) -> Reply | None:
        if not listing(ex):
            return None
        body = ex.body.replace(b"<IsTruncated>false</IsTruncated>",
                               b"<IsTruncated>true</IsTruncated><NextContinuationToken>again</NextContinuationToken>")
        return Reply.of(200, body)

    s3proxy.faults.rewrite = endless
    with pytest.raises(BackendError) as err:
        list(store.list("index/"))
    assert "again" in err.value.message and err.value.exit_code == ExitCode.BACKEND


def test_listing_that_comes_round_again(store: S3Backend, s3proxy: Proxy) -> None:
    """A fresh token every time, but the same page: was an endless loop too."""
    n = iter(range(1 << 30))

    def cycling(ex: Exchange) -> Reply | None:
        if not listing(ex):
            return None
        more = f"<IsTruncated>true</IsTruncated><NextContinuationToken>t{next(n)}</NextContinuationToken>"
        return Reply.of(200, ex.body.replace(b"<IsTruncated>false</IsTruncated>", more.encode()))

    s3proxy.faults.rewrite = cycling
    with pytest.raises(BackendError, match=r"again|without a key") as err:
        list(store.list("index/"))
    assert err.value.exit_code == ExitCode.BACKEND


def contents(key: str, size: int = 5) -> bytes:
    return f"<Contents><Key>{key}</Key><Size>{size}</Size></Contents>".encode()


def test_foreign_keys_in_a_listing_are_skipped(store: S3Backend, s3proxy: Proxy) -> None:
    """Keys outside the prefix, climbing out, empty components, too long, repeated: none is
    taken for an object name (names become requests and local cache paths)."""
    bad = ["other/index/" + "c" * 64, "repo/index/../../etc/passwd", "repo/index/../x", "repo/index//x",
           "repo/index/./x", "repo/index/" + "d" * 1100, "repo/index/" + "a" * 64, "repo/indexx/y",
           "repo/index/.tmp-x-1"]

    def foreign(ex: Exchange) -> Reply | None:
        if not listing(ex):
            return None
        i = ex.body.index(b"<Contents>")
        return Reply.of(200, ex.body[:i] + b"".join(contents(k) for k in bad) + ex.body[i:])

    s3proxy.faults.rewrite = foreign
    assert sorted(o.name for o in store.list("index/")) == ["index/" + "a" * 64, "index/" + "b" * 64]
    s3proxy.faults.rewrite = None
    assert store.get("index/" + "a" * 64) == b"first"
