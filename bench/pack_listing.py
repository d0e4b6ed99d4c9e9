#!/usr/bin/env python3
"""The cost of a backup's listing of the packs at start-up (repository/packcheck.py): one
paginated LIST of ``data/`` (names and sizes), then each indexed pack looked up in it.

For each N, a repository of N packs (one small blob each, indexed as a backup indexes them)
is built through the real Repository API, on a local directory and on the SeaweedFS S3
server the tests use (tests/seaweed.py), reached through the counting proxy
(tests/s3proxy.py), which counts requests and bytes. Each round opens the repository in a
fresh ``Repository`` (index built first, not timed: every backup builds it anyway) and times

- ``adopt``: what a backup ran before (``adopt_orphan_packs``: the LIST, each listed pack
  looked up in the index);
- ``check``: what it runs now (``check_packs``: the same LIST, adoption, and each indexed
  pack compared with the listing);

with the requests and bytes the proxy saw (S3). Run under the lock:

    flock /tmp/dv-bench.lock .venv/bin/python bench/pack_listing.py --packs 1000 10000 100000 --s3-packs 1000 10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltavault.backends.base import Backend  # noqa: E402
from deltavault.backends.local import LocalBackend  # noqa: E402
from deltavault.model.types import BlobType  # noqa: E402
from deltavault.repository import packcheck  # noqa: E402
from deltavault.repository.repository import Repository  # noqa: E402

PASSWORD = b"bench"
SCRYPT = (2**10, 8, 1)


def build(backend: Backend, n: int) -> None:
    """N packs of one 64-byte blob each (every blob fills its pack)."""
    repo = Repository.init(backend, PASSWORD, scrypt=SCRYPT, cache_root=None)
    repo.writer.pack_size = 1  # this run's writer only: the config keeps the default
    for i in range(n):
        repo.save_blob(BlobType.DATA, i.to_bytes(8, "little") * 8)
    repo.flush()


def timed(open_repo: Callable[[], Repository], what: str, rounds: int,
          counter: Callable[[], tuple[int, int]] | None) -> dict[str, object]:
    secs: list[float] = []
    reqs = recv = 0
    for _ in range(rounds):
        repo = open_repo()
        _ = repo.index.packs()  # built before the clock starts
        before = counter() if counter else (0, 0)
        read0 = repo.traffic.bytes_read
        t0 = time.perf_counter()
        if what == "adopt":
            packcheck.adopt_orphan_packs(repo.indexes)
        else:
            found = repo.check_packs()
            assert not found.missing and not found.truncated and not found.adopted
        secs.append(time.perf_counter() - t0)
        after = counter() if counter else (0, 0)
        reqs, recv = after[0] - before[0], after[1] - before[1]
        assert repo.traffic.bytes_read == read0  # a listing downloads nothing
    return {"median_s": round(statistics.median(secs), 4), "min_s": round(min(secs), 4),
            "max_s": round(max(secs), 4), "requests": reqs, "bytes_received": recv}


def local_rounds(n: int, rounds: int, work: Path) -> dict[str, object]:
    d = work / f"local-{n}"
    build(LocalBackend(d, fsync=False), n)
    opener = lambda: Repository.open(LocalBackend(d, fsync=False), lambda: PASSWORD, use_cache=False)  # noqa: E731
    out = {w: timed(opener, w, rounds, None) for w in ("adopt", "check")}
    shutil.rmtree(d)
    return out


def s3_rounds(sizes: list[int], rounds: int, work: Path) -> dict[int, dict[str, object]]:
    from tests.s3proxy import proxy
    from tests.seaweed import server

    from deltavault.backends import open_backend

    out: dict[int, dict[str, object]] = {}
    with server(work / "seaweed") as sw, proxy(sw.s3_port) as px:
        os.environ.update(sw.env())
        for n in sizes:
            bucket = sw.new_bucket()
            build(open_backend(sw.url(bucket, "repo")), n)  # straight to the server
            url = px.url(bucket, "repo")
            opener = lambda u=url: Repository.open(open_backend(u), lambda: PASSWORD, use_cache=False)  # noqa: E731

            def count() -> tuple[int, int]:
                s = px.snapshot()
                return s.requests, s.received

            out[n] = {w: timed(opener, w, rounds, count) for w in ("adopt", "check")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packs", type=int, nargs="*", default=[1000, 10_000, 100_000])
    ap.add_argument("--s3-packs", type=int, nargs="*", default=[1000, 10_000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pack_listing.json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dv-packlist-"))
    try:
        res: dict[str, dict[str, object]] = {"local": {}, "s3": {}}
        for n in a.packs:
            res["local"][str(n)] = local_rounds(n, a.rounds, work)
            print("local", n, json.dumps(res["local"][str(n)]), flush=True)
        if a.s3_packs:
            for n, r in s3_rounds(a.s3_packs, a.rounds, work).items():
                res["s3"][str(n)] = r
                print("s3", n, json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
