"""Peak memory of prune on a repository of 1 million blobs (docs/benchmarks.md, "## Prune").

The repository is built through the real Repository API: tiny data blobs (so a million of
them fit in ~45 MB of packs), trees of 1,000 files each, ten snapshots of 100,000 files.
Five snapshots are then forgotten and ``deltavault prune`` runs as a child process, whose
peak RSS (ru_maxrss of the child) is reported, next to a child that only opens the
repository (``snapshots``) for the cost of loading the index alone.

    flock /tmp/dv-bench.lock .venv/bin/python bench/prune_memory.py [--blobs N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from deltavault.backends.local import LocalBackend
from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository

PASSWORD = b"bench"
FILES_PER_TREE = 1000
SNAPSHOTS = 10


def build(root: Path, blobs: int) -> dict[str, float]:
    t0 = time.monotonic()
    repo = Repository.init(LocalBackend(root / "repo", fsync=False), PASSWORD, pack_size=1 << 20,
                           scrypt=(2**14, 8, 1), cache_root=root / "cache")
    per_snap = blobs // SNAPSHOTS
    sids = []
    counter = 0
    shared: dict[int, list[bytes]] = {}  # every 4th blob of the first half, kept by the second half

    def save_dir(ids: list[bytes], prefix: bytes) -> list[Node]:
        out = []
        for t in range(0, len(ids), FILES_PER_TREE):
            nodes = [Node(name=b"f%06d" % i, type=NodeType.FILE, size=16, content=[Full(bid, 16)])
                     for i, bid in enumerate(ids[t:t + FILES_PER_TREE])]
            tid, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(nodes)))
            out.append(Node(name=prefix + b"%05d" % (t // FILES_PER_TREE), type=NodeType.DIR, subtree=tid))
        return out

    for s in range(SNAPSHOTS):
        ids = []
        for _ in range(per_snap):
            data = counter.to_bytes(8, "little") + os.urandom(8)
            counter += 1
            ids.append(repo.save_blob(BlobType.DATA, data, compress=False)[0])
        trees = save_dir(ids, b"d")
        if s < SNAPSHOTS // 2:
            shared[s] = ids[::4]
        else:
            trees += save_dir(shared.pop(s - SNAPSHOTS // 2), b"kept")
        root_tid, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(trees)))
        repo.flush()
        sids.append(repo.save_snapshot(Snapshot(time="t", time_ns=time.time_ns(), hostname="bench",
                                                paths=[f"/s{s}"], tree=root_tid)))
    close = getattr(repo, "close", None)
    if close:
        close()
    for sid in sids[:SNAPSHOTS // 2]:
        repo.delete_snapshot(sid)
    return {"build_seconds": round(time.monotonic() - t0, 1), "blobs": float(len(repo.index))}


def child(root: Path, *args: str) -> tuple[float, float, dict[str, object]]:
    """(peak RSS MiB, seconds, last JSON line) of one CLI run in a fresh process."""
    pw = root / "pw"
    pw.write_bytes(PASSWORD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env.update(DELTAVAULT_REPOSITORY=str(root / "repo"), DELTAVAULT_PASSWORD_FILE=str(pw),
               DELTAVAULT_CACHE_DIR=str(root / "cache"))
    code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "deltavault", "--json", *args],
                       env=env, capture_output=True, text=True)
    secs = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{args} failed: {p.stderr}")
    rss_kib = int(p.stderr.strip().splitlines()[-1])
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    return rss_kib / 1024, secs, (lines[-1] if lines else {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blobs", type=int, default=1_000_000)
    ap.add_argument("--keep", help="build (or reuse) the repository here instead of a temp dir")
    a = ap.parse_args()
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="dv-prune-bench-"))
    try:
        info: dict[str, object] = {}
        if not (root / "repo" / "config").exists():
            root.mkdir(parents=True, exist_ok=True)
            info.update(build(root, a.blobs))
        pack_bytes = sum(p.stat().st_size for p in (root / "repo" / "data").rglob("*") if p.is_file())
        rss_open, secs_open, _ = child(root, "snapshots")
        rss_prune, secs_prune, summary = child(root, "prune")
        rss_check, secs_check, _ = child(root, "check")
        info.update({
            "blobs_target": a.blobs, "pack_bytes_before": pack_bytes,
            "open_peak_rss_mib": round(rss_open, 1), "open_seconds": round(secs_open, 1),
            "prune_peak_rss_mib": round(rss_prune, 1), "prune_seconds": round(secs_prune, 1),
            "prune_exclusive_seconds": round(float(summary.get("exclusive_seconds", 0.0)), 2),  # type: ignore[arg-type]
            "prune_plan_seconds": round(float(summary.get("plan_seconds", 0.0)), 2),  # type: ignore[arg-type]
            "prune_summary": {k: summary.get(k) for k in ("blobs", "blobs_used", "packs", "packs_delete",
                                                          "packs_repack", "blobs_repacked", "bytes_freed")},
            "check_after_peak_rss_mib": round(rss_check, 1), "check_after_seconds": round(secs_check, 1),
            "self_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        })
        print(json.dumps(info, indent=2))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
