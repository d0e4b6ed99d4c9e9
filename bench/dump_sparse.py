#!/usr/bin/env python3
"""``dump`` of a sparse file under its size limit (restore/dump.py, ``MAX_DUMPED``): a file
of 100 GiB of hole, as a tar of its snapshot and as one file, to a pipe (``wc -c``). Wall
time and the dump's peak RSS (``/usr/bin/time``): the zeros are streamed, memory bounded.

    flock /tmp/dv-bench.lock .venv/bin/python bench/dump_sparse.py [--gib 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.check_patches import repo_env  # noqa: E402

from deltavault.backends.local import LocalBackend  # noqa: E402
from deltavault.model.content import Hole  # noqa: E402
from deltavault.model.nodes import Node, NodeType, Tree  # noqa: E402
from deltavault.model.snapshot import Snapshot  # noqa: E402
from deltavault.model.types import BlobType  # noqa: E402
from deltavault.repository.repository import Repository  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dump_sparse.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dv-bench-dumpsparse-"))
    try:
        env = dict(repo_env(work), PYTHONPATH=str(ROOT / "src"))
        subprocess.run([sys.executable, "-m", "deltavault", "init"], env=env, check=True, capture_output=True)
        repo = Repository.open(LocalBackend(work / "repo"), lambda: b"bench", cache_root=work / "cache")
        size = args.gib << 30
        node = Node(name=b"sparse", type=NodeType.FILE, mode=0o644, content=[Hole(size)], size=size)
        import msgspec
        root = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree([node])))[0]
        repo.flush()
        sid = repo.save_snapshot(Snapshot(time="2026-01-01T00:00:00Z", time_ns=1, hostname="h", paths=["/src"],
                                          source_id="h:/src", tree=root))
        runs = {}
        for what, path in (("tar", "/"), ("file", "/sparse")):
            t0 = time.perf_counter()
            p = subprocess.run(f"/usr/bin/time -f %M {sys.executable} -m deltavault dump {sid} {path} | wc -c",
                               shell=True, env=env, capture_output=True, text=True, check=True)
            runs[what] = {"seconds": round(time.perf_counter() - t0, 1), "bytes": int(p.stdout),
                          "rss_mib": round(int(p.stderr.split()[-1]) / 1024, 1), "load_average": os.getloadavg()}
            print(what, runs[what], flush=True)
        result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "size": size, "runs": runs}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
