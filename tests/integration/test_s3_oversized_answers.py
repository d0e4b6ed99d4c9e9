"""The S3 backend against a store that answers with gigabytes: a whole object (a key file,
an index file, a snapshot) answered with 2 GiB, with that Content-Length or chunked without
one, is refused unread, in the backend and end to end with little memory, and nothing is
written (split from test_s3_hostile_store.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from bench.sparse_memory import run_measured

from deltavault.backends.s3 import S3Backend
from deltavault.errors import ExitCode, ObjectTooLarge
from tests.conftest import Cli, init_and_back_up
from tests.integration.test_s3_hostile_store import MiB
from tests.s3proxy import Exchange, Proxy, Reply
from tests.seaweed import Seaweed

GiB = 1024 * MiB


def oversized(folder: str, how: str, size: int = 2 * GiB) -> Callable[[Exchange], Reply | None]:
    """A GET of an object under ``folder`` answered with ``size`` bytes of zeros, sent piece
    by piece as they are read (never held): with that Content-Length ("length"), or chunked
    without one ("chunked")."""
    piece = b"\0" * MiB

    def answer(ex: Exchange) -> Reply | None:
        path = ex.target.split(" ")[0].split("?")[0]
        if ex.method != "GET" or ex.status != 200 or f"/{folder}/" not in path:
            return None
        if how == "length":
            head = Reply.of(200, b"", {"Content-Type": "binary/octet-stream", "ETag": '"x"'}, length=size)
            return Reply(head.data, more=(piece for _ in range(size // MiB)))
        head = Reply.of(200, b"", {"Content-Type": "binary/octet-stream", "ETag": '"x"',
                                   "Transfer-Encoding": "chunked"})
        head.data = head.data.replace(b"Content-Length: 0\r\n", b"")
        chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
        return Reply(head.data, more=(chunk for _ in range(size // MiB)))
    return answer


@pytest.mark.parametrize("how", ["length", "chunked"])
def test_a_whole_object_answered_with_gigabytes_is_refused(store: S3Backend, s3proxy: Proxy, how: str) -> None:
    """A GET of a whole object (a key file, an index file) read whatever the store sent:
    2 GiB for a key file were held in memory, twice. Now a Content-Length over the kind's
    limit is refused before the body is read, and a body without one is cut one byte past."""
    store.put("keys/" + "k" * 64, b"{}")
    for folder, limit in (("keys", MiB), ("index", 256 * MiB)):
        if how == "chunked" and folder == "index":
            continue  # 256 MiB through the proxy: the CLI test below reads a chunked snapshot
        s3proxy.faults.rewrite = oversized(folder, how)
        with pytest.raises(ObjectTooLarge, match=f"at most {limit} bytes") as err:
            store.get(folder + "/" + ("k" if folder == "keys" else "a") * 64)
        assert err.value.exit_code == ExitCode.BACKEND and not err.value.retryable
        if how == "length":
            assert f"answered {2 * GiB} bytes" in err.value.message
    s3proxy.faults.rewrite = None
    assert store.get("index/" + "a" * 64) == b"first"


def _objects(seaweed: Seaweed, bucket: str) -> dict[str, str]:
    got = seaweed.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in got}


@pytest.mark.parametrize(("folder", "how"), [("keys", "length"), ("index", "length"), ("snapshots", "chunked")])
def test_commands_on_a_store_answering_gigabytes_exit_15_with_little_memory(
        cli: Cli, seaweed: Seaweed, s3proxy: Proxy, tmp_path: Path, folder: str, how: str) -> None:
    """End to end: a backup whose key file, index file or snapshot the store answers with
    2 GiB (a said length, or chunked without one) exits 15 naming the object, with its
    memory far below the body (was: read whole, then copied), and writes nothing."""
    bucket = seaweed.new_bucket()
    cli.env.update(seaweed.env(), DELTAVAULT_REPOSITORY=s3proxy.url(bucket, "repo"))
    src = tmp_path / "src"
    init_and_back_up(cli, src, {"a": os.urandom(300_000)})
    (src / "b").write_bytes(b"new")
    before = _objects(seaweed, bucket)
    s3proxy.faults.rewrite = oversized(folder, how)
    r = run_measured([sys.executable, "-m", "deltavault", "backup", str(src), "--no-cache"], cli.env)
    peak = r.peak_main
    s3proxy.faults.rewrite = None
    assert r.returncode == ExitCode.BACKEND, r.stderr
    assert f"{folder}/" in r.stderr and "refused unread" in r.stderr, r.stderr
    assert peak < 600 * MiB, f"peak RSS {peak >> 20} MiB for a 2 GiB answer"
    assert _objects(seaweed, bucket) == before
    assert cli("backup", str(src), "--no-cache", timeout=300).returncode == 0
    assert cli("check", timeout=120).returncode == 0
