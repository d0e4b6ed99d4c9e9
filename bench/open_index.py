"""Opening a repository of 1 million blobs: the index built from its files, or read back
from the local copy of the built index (docs/benchmarks.md, "The goal: a no-change
incremental of 1M files").

The repository is bench/prune_memory.py's (``build``: tiny blobs through the real API).
Each open is a fresh process timed around ``Repository.open`` (config, key derivation at
scrypt 2^14, the index), with its peak RSS. With ``--other-src``, another revision's
``src`` (e.g. ``git archive <rev> src | tar -x -C /tmp/old``) opens the same repository
in turn with this tree's, round by round, so both meet the same load.

    flock /tmp/dv-bench.lock .venv/bin/python bench/open_index.py --keep DIR [--other-src /tmp/old/src]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from prune_memory import PASSWORD, build  # noqa: E402

_CHILD = """
import json, resource, sys, time
from pathlib import Path
from deltavault.backends.local import LocalBackend
from deltavault.repository.repository import Repository
root = Path(sys.argv[1])
t = time.perf_counter()
repo = Repository.open(LocalBackend(root / "repo", fsync=False), lambda: sys.argv[2].encode(),
                       cache_root=root / "cache")
blobs = len(repo.index)  # inside the timing: an open builds the index only at first use
secs = time.perf_counter() - t
print(json.dumps({"open_seconds": round(secs, 3), "blobs": blobs,
                  "from_copy": getattr(repo.indexes, "from_copy", None),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def child_json(code: str, args: list[str], src: Path, what: str) -> dict[str, object]:
    """Runs ``code`` in a fresh interpreter with ``src`` as deltavault's source tree; its
    last line of output is the JSON result."""
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    if p.returncode != 0:
        raise SystemExit(f"{what} failed: {p.stderr}")
    out: dict[str, object] = json.loads(p.stdout.splitlines()[-1])
    return out


def open_once(root: Path, src: Path) -> dict[str, object]:
    return child_json(_CHILD, [str(root), PASSWORD.decode()], src, f"opening with {src}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blobs", type=int, default=1_000_000)
    ap.add_argument("--keep", help="build (or reuse) the repository here instead of a temp dir")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--other-src", type=Path, help="another revision's src, opened in turn with this one's")
    a = ap.parse_args()
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="dv-open-bench-"))
    srcs = {"this": ROOT / "src", **({"other": a.other_src} if a.other_src else {})}
    try:
        if not (root / "repo" / "config").exists():
            root.mkdir(parents=True, exist_ok=True)
            print(json.dumps(build(root, a.blobs)), flush=True)
        for label, src in srcs.items():  # unmeasured: this tree's first open writes its copy
            print(json.dumps({"src": label, "warm-up": True, **open_once(root, src)}), flush=True)
        for r in range(a.rounds):
            for label, src in srcs.items():
                print(json.dumps({"src": label, "round": r, **open_once(root, src)}), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
