"""The S3 backend against a store that lies: a real SeaweedFS (tests/seaweed.py) behind the
proxy of tests/s3proxy.py, which rewrites its answers (endless or foreign listings, ranges
answered with the whole object, a 200 carrying an error, a body that stalls, a redirect).
Each must end in a precise error (exit 15, the backend's) or be ignored, never loop, grow
memory, or accept wrong data; the stored objects stay as they were. Objects answered with
gigabytes are in test_s3_oversized_answers.py."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from deltavault.backends.s3 import S3Backend
from deltavault.backends.s3location import S3Location, S3Options
from deltavault.errors import BackendError, ExitCode
from tests.conftest import Cli, init_and_back_up
from tests.s3proxy import Exchange, Proxy, Reply
from tests.seaweed import Seaweed

MiB = 1024 * 1024


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


PACK = "data/ab/ab" + "0" * 62
BODY = bytes(range(256)) * 4096  # 1 MiB


def ranged(answer: Callable[[Exchange], Reply]) -> Callable[[Exchange], Reply | None]:
    """``answer`` instead of the store's to ranged reads of PACK."""
    return lambda ex: answer(ex) if ex.method == "GET" and ex.status == 206 else None


@pytest.fixture
def pack(store: S3Backend) -> S3Backend:
    store.put(PACK, BODY)
    return store


def whole(ex: Exchange) -> Reply:
    return Reply.of(200, BODY, {"ETag": ex.headers.get("etag", '"x"')})


def test_range_answered_with_the_whole_object(pack: S3Backend, s3proxy: Proxy) -> None:
    """A store that ignores Range: get returned the whole object as the 100 bytes asked (the
    wrong bytes), and get_sized reserved and read all of it (unbounded memory)."""
    s3proxy.faults.rewrite = ranged(whole)
    reserved: list[int] = []
    with pytest.raises(BackendError, match="answered 1048576 bytes for a range of 100") as err:
        pack.get(PACK, 1000, 100)
    assert err.value.exit_code == ExitCode.BACKEND and not err.value.retryable
    with pytest.raises(BackendError, match="answered 1048576 bytes for a range of 4096"):
        pack.get_sized(PACK, 8192, 4096, reserved.append)
    assert reserved == []  # refused before any memory was set aside for it
    s3proxy.faults.rewrite = None
    assert pack.get(PACK, 1000, 100) == BODY[1000:1100]


def test_range_answered_with_more_or_other_bytes(pack: S3Backend, s3proxy: Proxy) -> None:
    """A 206 with more bytes than asked, or from another offset, or fewer than the object
    has there: each was taken as the range asked for."""
    def answer(first: int, n: int) -> Callable[[Exchange], Reply]:
        span = {"Content-Range": f"bytes {first}-{first + n - 1}/{len(BODY)}"}
        return lambda ex: Reply.of(206, BODY[first:first + n], span)

    for (first, n), match in {(1000, 5000): "answered 5000 bytes for a range of 100",
                              (0, 100): "when asked from byte 1000",
                              (1000, 50): "answered 50 bytes of the 100 asked"}.items():
        s3proxy.faults.rewrite = ranged(answer(first, n))
        with pytest.raises(BackendError, match=match):
            pack.get(PACK, 1000, 100)
        with pytest.raises(BackendError, match=match):
            pack.get_sized(PACK, 1000, 100, lambda n: None)
    s3proxy.faults.rewrite = None
    assert bytes(pack.get_sized(PACK, 1000, 100, lambda n: None)) == BODY[1000:1100]


def test_a_body_that_lies_or_stalls_times_out(pack: S3Backend, s3proxy: Proxy) -> None:
    """Already safe: a Content-Length larger than the body sent, and a body that stops half
    way and holds the connection, end with the read timeout (a retryable backend error)."""
    part = BODY[1000:1050]
    for stall in (False, True):
        reply = Reply.of(206, part, {"Content-Range": f"bytes 1000-1099/{len(BODY)}"}, length=100)
        reply.stall = stall
        s3proxy.faults.rewrite = ranged(lambda ex, r=reply: r)  # type: ignore[misc]
        for read in (lambda: pack.get(PACK, 1000, 100), lambda: pack.get_sized(PACK, 1000, 100, lambda n: None)):
            with pytest.raises(BackendError, match=r"timed out|lost|ended after") as err:
                read()
            assert err.value.exit_code == ExitCode.BACKEND


def test_a_listing_answered_with_an_html_page(store: S3Backend, s3proxy: Proxy) -> None:
    """A 200 with a proxy's HTML error page instead of a listing: botocore parses it into an
    empty answer, which was an empty listing (every object missing) and exists() False; and
    instead of a HEAD's answer, whose length was taken for the object's."""
    page = b"<html><head><title>502 Bad Gateway</title></head><body>upstream gone</body></html>"
    s3proxy.faults.rewrite = lambda ex: Reply.of(200, page, {"Content-Type": "text/html"}) if listing(ex) else None
    for call in (lambda: list(store.list("index/")), store.exists):
        with pytest.raises(BackendError, match="not a listing") as err:
            call()
        assert err.value.exit_code == ExitCode.BACKEND
    s3proxy.faults.rewrite = lambda ex: Reply.of(200, page, {"Content-Type": "text/html"}) if ex.method == "HEAD" else None
    with pytest.raises(BackendError, match="HEAD has no ETag"):
        store.stat("index/" + "a" * 64)  # was the page's length, taken for the object's
    s3proxy.faults.rewrite = None
    assert store.exists() and len(list(store.list("index/"))) == 2
    assert store.stat("index/" + "a" * 64).size == 5


def test_a_redirect_to_another_host_is_not_followed(pack: S3Backend, s3proxy: Proxy) -> None:
    """Already safe: a 307 to another host is an error; nothing is sent there (botocore does
    not follow redirects across hosts), so no signed request or credentials leave."""
    elsewhere = socket.socket()
    elsewhere.bind(("127.0.0.1", 0))
    elsewhere.listen(4)
    elsewhere.settimeout(0.5)
    where = f"http://127.0.0.1:{elsewhere.getsockname()[1]}"
    try:
        for status in (301, 302, 307, 308):
            s3proxy.faults.rewrite = lambda ex, s=status: Reply.of(  # type: ignore[misc]
                s, b"", {"Location": where + ex.target}) if ex.method == "GET" else None
            with pytest.raises(BackendError) as err:
                pack.get(PACK, 0, 100)
            assert err.value.exit_code == ExitCode.BACKEND
            with pytest.raises(TimeoutError):
                elsewhere.accept()
    finally:
        elsewhere.close()


def test_multipart_complete_answered_200_with_an_error(seaweed: Seaweed, s3proxy: Proxy,
                                                       s3env: dict[str, str]) -> None:
    """Already safe: S3 may answer CompleteMultipartUpload 200 with an <Error> body; botocore
    turns it into an error, which is retryable, and the upload is aborted."""
    bucket = seaweed.new_bucket()
    b = S3Backend(S3Location(bucket, "repo", s3proxy.endpoint),
                  S3Options(read_timeout=5, multipart_threshold=5 * MiB, part_size=5 * MiB))
    error = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
             b"<Message>We encountered an internal error. Please try again.</Message></Error>")

    def complete(ex: Exchange) -> Reply | None:
        if ex.method == "POST" and "uploadId=" in ex.target:
            return Reply.of(200, error)
        return None

    s3proxy.faults.rewrite = complete
    with pytest.raises(BackendError, match="InternalError") as err:
        b.put(PACK, BODY * 6)
    assert err.value.retryable and err.value.exit_code == ExitCode.BACKEND
    s3proxy.faults.rewrite = None
    assert seaweed.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_an_upload_answered_200_but_not_stored(seaweed: Seaweed, s3proxy: Proxy, s3env: dict[str, str]) -> None:
    """A PUT (or part, or multipart completion) answered 200 by something that is not the
    store (a proxy's own page, no ETag) and the object not there: put returned as if stored,
    and the pack would have been indexed though missing. Now a retryable error (exit 15)."""
    bucket = seaweed.new_bucket()
    b = S3Backend(S3Location(bucket, "repo", s3proxy.endpoint),
                  S3Options(read_timeout=5, multipart_threshold=5 * MiB, part_size=5 * MiB))
    page = b"<html><body>OK</body></html>"

    def lost(ex: Exchange) -> Reply | None:
        path, _, query = ex.target.split(" ")[0].partition("?")
        if ex.method not in ("PUT", "POST") or ex.status != 200 or query == "uploads":
            return None
        seaweed.client().delete_object(Bucket=bucket, Key=path.split("/", 2)[2])
        return Reply.of(200, page, {"Content-Type": "text/html"})

    s3proxy.faults.rewrite = lost
    for put in (lambda: b.put(PACK, BODY), lambda: b.put("locks/" + "e" * 64, b"lock"),
                lambda: b.put(PACK, BODY * 6)):
        with pytest.raises(BackendError, match="has no ETag") as err:
            put()
        assert err.value.retryable and err.value.exit_code == ExitCode.BACKEND
    s3proxy.faults.rewrite = None
    assert list(b.list("")) == []
    b.put(PACK, BODY)
    assert b.get(PACK) == BODY


def test_commands_on_a_lying_store_exit_15_and_leave_it_intact(cli: Cli, seaweed: Seaweed, s3proxy: Proxy,
                                                               tmp_path: Path) -> None:
    """End to end: a listing that never ends (was a hang) makes a command exit 15 (the
    backend's code); pack reads answered from another offset than asked (were taken as the
    bytes asked for) fail the restore naming the lie, exit 15 too; with the store honest again, the
    repository checks whole and restores."""
    bucket = seaweed.new_bucket()
    cli.env.update(seaweed.env(), DELTAVAULT_REPOSITORY=s3proxy.url(bucket, "repo"))
    src = tmp_path / "src"
    init_and_back_up(cli, src, {"a": os.urandom(300_000), "b": b"small file\n"})

    def endless(ex: Exchange) -> Reply | None:
        more = b"<IsTruncated>true</IsTruncated><NextContinuationToken>again</NextContinuationToken>"
        return Reply.of(200, ex.body.replace(b"<IsTruncated>false</IsTruncated>", more)) if listing(ex) else None

    s3proxy.faults.rewrite = endless
    r = cli("snapshots", timeout=120)
    assert r.returncode == ExitCode.BACKEND and "never end" in r.stderr, r.stderr

    def other_range(ex: Exchange) -> Reply | None:
        if ex.method != "GET" or ex.status != 206:
            return None
        key = ex.target.split(" ")[0].split("?")[0].split("/", 2)[2]
        data = seaweed.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return Reply.of(206, data[100:], {"Content-Range": f"bytes 100-{len(data) - 1}/{len(data)}"})

    s3proxy.faults.rewrite = other_range
    # A store that lies is not damage: the restore (and its dry run) reported the tree it
    # could not read as corrupt (13), and the user was sent to check and repair a
    # repository that is whole. Now exit 15, naming the store's answer, as a file's content.
    for dry in ((), ("--dry-run",)):
        r = cli("restore", "latest", "--target", str(tmp_path / "out"), *dry, timeout=120)
        assert r.returncode == ExitCode.BACKEND, r.stdout + r.stderr
        assert "the S3 server answered the range" in r.stderr and "when asked from byte 0" in r.stderr, r.stderr
    s3proxy.faults.rewrite = None
    assert cli("check", "--read-data", timeout=120).returncode == 0
    r = cli("restore", "latest", "--target", str(tmp_path / "again"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again" / "src" / "b").read_bytes() == b"small file\n"


def test_a_list_of_versions_that_never_ends(store: S3Backend, s3proxy: Proxy) -> None:
    """The versions of an object (deleted one by one in an Object Lock bucket), with the
    same markers page after page: was an endless loop collecting the same version ids."""
    def endless(ex: Exchange) -> Reply | None:
        if not (ex.method == "GET" and "versions" in ex.target.split(" ")[0]):
            return None
        more = b"<IsTruncated>true</IsTruncated><NextKeyMarker>k</NextKeyMarker>"
        return Reply.of(200, ex.body.replace(b"<IsTruncated>false</IsTruncated>", more))

    s3proxy.faults.rewrite = endless
    key = store.loc.root + "index/" + "a" * 64
    with pytest.raises(BackendError, match="never end") as err:
        store._versions("index/" + "a" * 64, key)
    assert err.value.exit_code == ExitCode.BACKEND


def test_a_pack_the_store_says_it_kept_and_did_not(cli: Cli, seaweed: Seaweed, s3proxy: Proxy,
                                                   tmp_path: Path) -> None:
    """A PUT answered as S3 does (200, ETag) with nothing kept cannot be seen from the
    answer: the backup succeeds and its index names a missing pack. The design relies on
    check (docs/design.md, "A store that lies"): it reports the pack, exit 13."""
    bucket = seaweed.new_bucket()
    cli.env.update(seaweed.env(), DELTAVAULT_REPOSITORY=s3proxy.url(bucket, "repo"))
    assert cli("init").returncode == 0
    lost: list[str] = []

    def keep_nothing(ex: Exchange) -> Reply | None:
        key = ex.target.split(" ")[0].split("?")[0].partition("/repo/")[2]
        if ex.method == "PUT" and key.startswith("data/") and ex.status == 200:
            key = "repo/" + key
            seaweed.client().delete_object(Bucket=bucket, Key=key)
            lost.append(key.rsplit("/", 1)[1])
        return None

    s3proxy.faults.rewrite = keep_nothing
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_bytes(os.urandom(100_000))
    assert cli("backup", str(tmp_path / "src")).returncode == 0
    s3proxy.faults.rewrite = None
    assert lost
    r = cli("check", timeout=120)
    assert r.returncode == ExitCode.CORRUPT and lost[0][:8] in r.stdout + r.stderr, r.stdout + r.stderr
