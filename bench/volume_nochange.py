#!/usr/bin/env python3
"""The no-change incremental of a volume, two revisions interleaved: what metadata digests cost.

Each revision gets its own repository and cache, and backs up a copy of disk-v2.img twice
(the first backup, then fs-digests with every inode changed); then, round after round in
alternating order (A B, B A, ...), each backs up the same image once more: fs-digests,
one racy inode changed, nothing else. Each backup is a fresh CLI process whose wall time,
user+sys CPU and peak RSS are recorded (bench/ab.py's ``run``).

    flock /tmp/dv-bench.lock bench/volume_nochange.py --datasets ../data/ds --a main --b HEAD [--rounds 7]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ab import Run, checkout, finish, revision_args, run  # noqa: E402


def main() -> None:
    a = revision_args(__doc__, "volume_nochange", 7).parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    img = a.work / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(a.datasets / "disk-v2.img"), str(img)], check=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    revs = {"A": checkout(a.a, a.work / "rev-a"), "B": checkout(a.b, a.work / "rev-b")}
    envs: dict[str, dict[str, str]] = {}
    for who in revs:
        envs[who] = dict(base, DELTAVAULT_PASSWORD="bench", DELTAVAULT_CACHE_DIR=str(a.work / f"cache-{who}"))
        repo = str(a.work / f"repo-{who}")
        run(revs[who], envs[who], "-r", repo, "init")
        for _ in range(2):
            run(revs[who], envs[who], "-r", repo, "backup", "--volume", str(img))
    loads = [os.getloadavg()]
    runs: dict[str, list[Run]] = {"A": [], "B": []}
    order: list[str] = []
    for rnd in range(a.rounds):
        for who in ("A", "B") if rnd % 2 == 0 else ("B", "A"):
            r = run(revs[who], envs[who], "-r", str(a.work / f"repo-{who}"), "backup", "--volume", str(img))
            runs[who].append(r)
            order.append(who)
            print(f"round {rnd + 1} {who}: {r.seconds:.2f} s, {r.cpu:.2f} CPU-s, {r.rss_mib:.0f} MiB",
                  file=sys.stderr)
    loads.append(os.getloadavg())
    result: dict[str, object] = {"a": a.a, "b": a.b, "rounds": a.rounds, "when": time.strftime("%Y-%m-%d %H:%M %Z"),
              "load_average_start_end": [[round(x, 2) for x in la] for la in loads], "order": order}
    for who in ("A", "B"):
        rs = runs[who]
        result[who] = {"seconds": [round(r.seconds, 3) for r in rs], "cpu": [round(r.cpu, 3) for r in rs],
                       "rss_mib": [round(r.rss_mib, 1) for r in rs],
                       "median_seconds": round(statistics.median(r.seconds for r in rs), 3),
                       "median_cpu": round(statistics.median(r.cpu for r in rs), 3)}
    finish(a, result)
    shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
