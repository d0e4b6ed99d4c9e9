#!/usr/bin/env python3
"""``restore --volume --verify`` of the 1 TiB sparse volume (docs/benchmarks.md, *Scale: a
1 TiB sparse volume*; issue #18), one deltavault src/ against another.

The ``raw`` image of bench/sparse_volume.py (``--size-gib`` with ``--data-gib`` of random
data in 64 evenly spaced islands) is backed up once, then restored with ``--verify`` by
each ``--src`` in turn, ``--rounds`` times, interleaved; a run still going after
``--timeout`` seconds is killed (its ``rchar`` says how far it read). Each run is a fresh
CLI process measured by bench/memory.py's ``measured`` under /tmp/dv-bench.lock, the page
cache dropped before it; a finished restore is compared with the image.

    bench/sparse_verify.py --src main=/work/main/src --src new=src [--work /tmp/sparse-verify]
                           [--size-gib 1024] [--data-gib 4] [--rounds 1] [--timeout 300] [--out FILE] [--no-lock]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import sparse_volume  # noqa: E402
from bench.quiesce import compiled  # noqa: E402
from bench.sparse_memory import build_sparse  # noqa: E402
from bench.sparse_volume import GiB, Tool, islands, same_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sparse-verify"))
    ap.add_argument("--size-gib", type=int, default=1024)
    ap.add_argument("--data-gib", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-lock", action="store_true", help="smoke runs only: measure without the bench lock")
    a = ap.parse_args()
    sparse_volume.LOCKING = not a.no_lock
    srcs = {n: str(Path(p).resolve()) for n, p in (s.split("=", 1) for s in a.src)}
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    img, repo, target = work / "volume.img", work / "repo", work / "restored.img"
    tool = Tool(work)
    base = dict(tool.env)
    for src in srcs.values():
        compiled(sys.executable, {**base, "PYTHONPATH": src})
    t0 = time.time()
    size = a.size_gib * GiB
    build_sparse(img, size, islands(size, a.data_gib * GiB))
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    dv = [sys.executable, "-m", "deltavault", "--json", "-r", str(repo)]
    first = {**base, "PYTHONPATH": next(iter(srcs.values()))}
    subprocess.run([*dv, "init"], env=first, check=True, capture_output=True)
    backup = subprocess.run([*dv, "backup", "--volume", str(img)], env=first, check=True, capture_output=True,
                            text=True)
    sid = [json.loads(x) for x in backup.stdout.splitlines() if x.startswith("{")][-1]["snapshot"]
    rows = []
    try:
        for r in range(a.rounds):
            for name in (list(srcs) if r % 2 == 0 else list(srcs)[::-1]):
                tool.env = {**base, "PYTHONPATH": srcs[name]}
                target.unlink(missing_ok=True)
                row, text = tool.run(f"{name}: restore --volume --verify", [*dv, "restore", "--volume", sid,
                                     str(target), "--verify"], repo, a.timeout)
                row["src"] = name
                summary = [o for o in (json.loads(x) for x in text.splitlines() if x.startswith("{"))
                           if o.get("type") == "summary"]
                if summary:
                    row.update({k: summary[-1].get(k) for k in ("pages_verified", "pages_hashed",
                                                                "pages_mismatched", "bytes_written")})
                    row["restored_equal"] = same_bytes(img, target)
                rows.append(row)
    finally:
        target.unlink(missing_ok=True)
        img.unlink(missing_ok=True)
        shutil.rmtree(repo, ignore_errors=True)
    doc = {"benchmark": "sparse_verify", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
           "size_gib": a.size_gib, "data_gib": a.data_gib, "timeout": a.timeout, "srcs": srcs, "runs": rows}
    text = json.dumps(doc, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
