#!/usr/bin/env python3
"""What reading every pack's header costs ``check`` (``--read-headers``,
maintenance/check.py): one ranged read at each pack's end, 8 in flight.

Two repositories, each on a local directory and on the SeaweedFS S3 server the tests use
(tests/seaweed.py) behind the counting proxy (tests/s3proxy.py):

- ``packs``: N packs of one small blob each and no snapshot (bench/pack_listing.py's
  ``build``): plain ``check`` is the listing and nothing else, so the difference is the
  cost per pack;
- ``trees``: tree-v1 then tree-v2 of the benchmark's datasets backed up at the default
  pack size (32 MiB): ``check`` reads every tree as well.

Each round runs ``check_repository`` without headers and with them, in alternating order
(in-process, on a fresh ``Repository`` with its index built before the clock starts):
seconds, and on S3 the requests and bytes the proxy saw (then the same straight to the
server, for time: the proxy's threads run in this process). Run under the lock:

    flock /tmp/dv-bench.lock .venv/bin/python bench/check_headers.py --datasets /work/data/ds
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

from bench.pack_listing import PASSWORD, build  # noqa: E402

from deltavault.backends.local import LocalBackend  # noqa: E402
from deltavault.maintenance.check import check_repository  # noqa: E402
from deltavault.repository.repository import Repository  # noqa: E402

Counter = Callable[[], tuple[int, int]]


def backup_trees(repo: Path, datasets: Path, work: Path) -> None:
    """tree-v1 then tree-v2, as one source, by the CLI."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env.update(DELTAVAULT_REPOSITORY=str(repo), DELTAVAULT_PASSWORD=PASSWORD.decode(),
               DELTAVAULT_CACHE_DIR=str(work / "cache"), PYTHONPATH=str(ROOT / "src"))
    src = work / "src"
    for v in ("v1", "v2"):
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(datasets / f"tree-{v}", src)
        subprocess.run([sys.executable, "-m", "deltavault", "backup", str(src)], env=env, check=True,
                       capture_output=True)
    shutil.rmtree(src)


def rounds(opener: Callable[[], Repository], n: int, counter: Counter | None) -> dict[str, object]:
    got: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for i in range(n):
        for headers in ((False, True) if i % 2 == 0 else (True, False)):
            repo = opener()
            _ = repo.index.packs()
            before = counter() if counter else (0, 0)
            t0 = time.perf_counter()
            rep = check_repository(repo, headers=headers)
            dt = time.perf_counter() - t0
            after = counter() if counter else (0, 0)
            assert not rep.errors, rep.errors[:3]
            got[headers].append({"seconds": round(dt, 4), "requests": after[0] - before[0],
                                 "bytes_received": after[1] - before[1], "headers_read": rep.headers_read,
                                 "packs": rep.packs, "snapshots": rep.snapshots})
    return {("check --read-headers" if h else "check"): {"rounds": r,
                                                          "median_s": statistics.median(x["seconds"] for x in r)}
            for h, r in got.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--packs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "check_headers.json")
    a = ap.parse_args()
    from tests.s3proxy import proxy
    from tests.seaweed import server

    from deltavault.backends import open_backend

    work = Path(tempfile.mkdtemp(prefix="dv-bench-checkheaders-"))
    res: dict[str, object] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "load_average_start": os.getloadavg()}
    try:
        for kind in ("packs", "trees"):
            d = work / f"local-{kind}"
            b = LocalBackend(d, fsync=False)
            if kind == "packs":
                build(b, a.packs)
            else:
                Repository.init(b, PASSWORD, scrypt=(2**10, 8, 1), cache_root=None)
                backup_trees(d, a.datasets, work)
            opener = lambda d=d: Repository.open(LocalBackend(d, fsync=False), lambda: PASSWORD,  # noqa: E731
                                                 use_cache=False)
            res[f"local {kind}"] = rounds(opener, a.rounds, None)
            print(f"local {kind}", json.dumps(res[f"local {kind}"]), flush=True)
        with server(work / "seaweed") as sw, proxy(sw.s3_port) as px:
            os.environ.update(sw.env())
            for kind in ("packs", "trees"):
                bucket = sw.new_bucket()
                # the same repository, object by object, so both stores hold the same packs
                s3 = sw.client()
                for f in (work / f"local-{kind}").rglob("*"):
                    if f.is_file() and f.parent.name != "locks":
                        s3.put_object(Bucket=bucket, Key=f"repo/{f.relative_to(work / f'local-{kind}')}",
                                      Body=f.read_bytes())
                url = px.url(bucket, "repo")
                opener = lambda u=url: Repository.open(open_backend(u), lambda: PASSWORD,  # noqa: E731
                                                       use_cache=False)

                def count() -> tuple[int, int]:
                    s = px.snapshot()
                    return s.requests, s.received

                res[f"s3 {kind}"] = rounds(opener, a.rounds, count)
                print(f"s3 {kind}", json.dumps(res[f"s3 {kind}"]), flush=True)
                # Straight to the server: the proxy's threads share this process's GIL.
                straight = sw.url(bucket, "repo")
                direct = lambda u=straight: Repository.open(open_backend(u), lambda: PASSWORD,  # noqa: E731
                                                            use_cache=False)
                res[f"s3-direct {kind}"] = rounds(direct, a.rounds, None)
                print(f"s3-direct {kind}", json.dumps(res[f"s3-direct {kind}"]), flush=True)
        res["load_average_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
