"""What writing the local index copy at the end of a backup costs, and what it saves the
next open (docs/benchmarks.md, "Scale: blobs in the index").

The repository is bench/prune_memory.py's (``build``: tiny blobs through the real API).
Each round, in turn with the copy written at the end of the run ("save") and not
("nosave", as before: the next open finds the copy stale, decodes the new index file and
rewrites the copy), a fresh process opens the repository, builds its index, stores
``--new`` blobs and flushes (index files written), then (save only) ``save_index_copy``;
a second fresh process then opens it and builds its index.

    flock /tmp/dv-bench.lock .venv/bin/python bench/copy_after_backup.py --keep DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from open_index import child_json  # noqa: E402
from prune_memory import PASSWORD  # noqa: E402

_CHILD = """
import json, os, resource, sys, time
from pathlib import Path
from deltavault.backends.local import LocalBackend
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository
root, mode, new = Path(sys.argv[1]), sys.argv[3], int(sys.argv[4])
t = time.perf_counter()
repo = Repository.open(LocalBackend(root / "repo", fsync=False), lambda: sys.argv[2].encode(),
                       cache_root=root / "cache")
blobs = len(repo.index)
out = {"mode": mode, "open_seconds": round(time.perf_counter() - t, 3), "blobs": blobs,
       "from_copy": repo.indexes.from_copy}
if mode != "open":
    t = time.perf_counter()
    for _ in range(new):
        repo.save_blob(BlobType.DATA, os.urandom(16), compress=False)
    repo.flush()
    out["store_seconds"] = round(time.perf_counter() - t, 3)
    out["index_files_written"] = repo.write_stats.index_files_written
    if mode == "save":
        t = time.perf_counter()
        out["copy_written"] = repo.save_index_copy()
        out["save_copy_seconds"] = round(time.perf_counter() - t, 3)
out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print(json.dumps(out))
"""


def run(root: Path, mode: str, new: int) -> dict[str, object]:
    return child_json(_CHILD, [str(root), PASSWORD.decode(), mode, str(new)], ROOT / "src", mode)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", required=True, help="a repository bench/prune_memory.py's build made")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=20_000, help="blobs each backup stores")
    a = ap.parse_args()
    root = Path(a.keep)
    print(json.dumps({"warm-up": True, **run(root, "open", 0)}), flush=True)  # the copy is current
    for r in range(a.rounds):
        for mode in ("save", "nosave"):
            backup = run(root, mode, a.new)
            after = run(root, "open", 0)
            print(json.dumps({"round": r, "backup": backup, "next_open": after}), flush=True)


if __name__ == "__main__":
    main()
