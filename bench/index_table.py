#!/usr/bin/env python3
"""The in-memory index alone, per blob: adds (as a load makes them, a pack of 20,000 at a
time), lookups that hit (``position``) and miss, and the table's bytes a blob, at N blobs
(docs/benchmarks.md, "The index table grows with the index"; issue #18).

Each ``--src`` is measured in a fresh process, in turn, for each N and round; times are CPU
seconds of this process (the machine is shared: its other load changes wall time more).

    flock /tmp/dv-bench.lock .venv/bin/python bench/index_table.py --blobs 1000000 10000000 \\
        --src /work/main/src /work/wt-idxgrow/src --rounds 3 --out bench/results/index_table.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PER_PACK = 20_000
PROBES = 200_000

CHILD = """
import gc, json, os, random, sys, time
from deltavault.repository import index
from deltavault.repository.pack import PackEntry
n, per, probes, reserve, size_at = (int(x) for x in sys.argv[1:6])
if size_at:
    index.SIZE_AT = size_at
probes = min(probes, n)
ids = os.urandom(32 * n)
gc.disable()  # as in a load: nothing here makes cycles, and a collection's pause is noise
def rss():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS"))
idx = index.Index()
base = rss()
t_add = 0.0
if reserve and hasattr(idx, "reserve"):
    t0 = time.process_time(); idx.reserve(n); t_add += time.process_time() - t0
for p in range(0, n, per):
    entries = [PackEntry(0, ids[32 * i:32 * i + 32], 100 * i, 40, 16) for i in range(p, min(n, p + per))]
    t0 = time.process_time(); idx.add_pack(p.to_bytes(32, "big"), entries); t_add += time.process_time() - t0
del entries
rss_per_blob = (rss() - base) / n  # the index's records, buckets and what the heap keeps between them
table = idx._table[1] if hasattr(idx, "_table") else idx._buckets
table_bytes = sys.getsizeof(table) + sum(sys.getsizeof(b) for b in table if b is not None)
rnd = random.Random(1)
hits = [ids[32 * i:32 * i + 32] for i in rnd.sample(range(n), probes)]
misses = [rnd.randbytes(32) for _ in range(probes)]
t0 = time.process_time()
for b in hits:
    idx.position(b)
t_hit = time.process_time() - t0
t0 = time.process_time()
for b in misses:
    b in idx
t_miss = time.process_time() - t0
print(json.dumps({"buckets": len(table), "add_us": t_add / n * 1e6, "hit_us": t_hit / probes * 1e6,
                  "miss_us": t_miss / probes * 1e6, "table_bytes_per_blob": table_bytes / n,
                  "rss_bytes_per_blob": rss_per_blob}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blobs", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--src", nargs="+", required=True,
                    help="source trees; DIR:N sets that run's SIZE_AT (records a bucket) to N")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-reserve", action="store_true", help="add to an empty table: it grows as it fills")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    results: dict[str, dict[str, object]] = {}
    for n in a.blobs:
        runs: dict[str, list[dict[str, float]]] = {}
        for _ in range(a.rounds):
            for src in a.src:
                tree, _, size_at = src.partition(":")
                env = dict(os.environ, PYTHONPATH=tree)
                out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(PER_PACK), str(PROBES),
                                      str(int(not a.no_reserve)), size_at or "0"], env=env, check=True,
                                     capture_output=True, text=True).stdout
                runs.setdefault(str(src), []).append(json.loads(out))
                print(n, src, out.strip(), file=sys.stderr, flush=True)
        for src, rs in runs.items():
            results.setdefault(str(n), {})[src] = {
                k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]} | {"rounds": len(rs)}
    print(json.dumps(results, indent=1))
    if a.out:
        meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg": os.getloadavg(),
                "reserve": not a.no_reserve}
        a.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
