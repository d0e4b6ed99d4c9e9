#!/usr/bin/env python3
"""Snapshot commands on a repository of 10,000 snapshots (docs/benchmarks.md, issue #18).

The repository is built through the real code paths, quickly: a tiny tree is backed up
twice by the file engine (``run_backup``: two real trees, so ``diff`` has changes to show),
then ``Repository.save_snapshot`` stores N snapshots, each the engine's snapshot of one of
the two trees with its own time (one every 97 minutes back from now, so the daily, weekly,
monthly and yearly rules all have buckets to fill). Nothing writes repository files by hand.

Then each command runs as a child CLI process (interpreter start, key derivation, opening
the repository included), ``--repeat`` times, with a warm local cache (one untimed run
first fills it): ``snapshots``, ``forget --keep-last 5 --dry-run``, ``forget --keep-daily 7
--keep-weekly 5 --keep-monthly 12 --keep-yearly 3 --dry-run``, ``diff A B`` (two snapshots by
id prefix) and ``report --json``. It prints a table of wall times (median, min, max) and
writes them as JSON.

    flock /tmp/dv-bench.lock .venv/bin/python bench/scale_snapshots.py [--snapshots 10000]
        [--repeat 5] [--work DIR] [--out bench/results/scale_snapshots.json] [--label NAME]
        [--src OTHER_CHECKOUT/src]    # the same repository, timed with another revision
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import msgspec  # noqa: E402

from deltavault.backends.local import LocalBackend  # noqa: E402
from deltavault.backup.files.options import FileBackupOptions  # noqa: E402
from deltavault.backup.files.run import BackupRequest, run_backup  # noqa: E402
from deltavault.repository.repository import Repository  # noqa: E402

PASSWORD = b"bench"
SCRYPT = (2**10, 8, 1)
STEP_NS = 97 * 60 * 10**9


def opened(repo_dir: Path, cache: Path) -> Repository:
    return Repository.open(LocalBackend(repo_dir, fsync=False), lambda: PASSWORD, cache_root=cache)


def build(work: Path, snapshots: int) -> tuple[Path, Path, str, str]:
    """The repository, its cache, and the ids of two snapshots of different trees."""
    repo_dir, cache, stamp = work / "repo", work / "cache", work / f"built-{snapshots}.json"
    if stamp.exists():
        a, b = json.loads(stamp.read_text())
        return repo_dir, cache, a, b
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    Repository.init(LocalBackend(repo_dir, fsync=False), PASSWORD, scrypt=SCRYPT, cache_root=cache)
    src = work / "src"
    for i in range(20):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    repo = opened(repo_dir, cache)
    t0 = time.monotonic()
    opts = FileBackupOptions(racy_window_ns=0)
    first = run_backup(repo, BackupRequest(paths=[str(src)], options=opts))
    (src / "d0" / "f0.txt").write_text("changed\n")
    (src / "d1" / "new.txt").write_text("added\n")
    (src / "d2" / "f2.txt").unlink()
    second = run_backup(repo, BackupRequest(paths=[str(src)], options=opts))
    models = [repo.load_snapshot(first.snapshot_id), repo.load_snapshot(second.snapshot_id)]
    for sid in (first.snapshot_id, second.snapshot_id):
        repo.delete_snapshot(sid)  # their times are now; the N below carry the times
    now = time.time_ns()
    ids: list[str] = []
    for i in range(snapshots):
        t_ns = now - (snapshots - i) * STEP_NS
        when = datetime.fromtimestamp(t_ns / 1e9, UTC).isoformat().replace("+00:00", "Z")
        model = models[i % 2]
        ids.append(repo.save_snapshot(msgspec.structs.replace(model, time_ns=t_ns, time=when)))
        if i % 2000 == 1999:
            print(f"  {i + 1} snapshots, {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    a, b = ids[-2], ids[-1]  # the newest two: different trees
    stamp.write_text(json.dumps([a, b]))
    print(f"built {snapshots} snapshots in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return repo_dir, cache, a, b


def commands(a: str, b: str) -> dict[str, list[str]]:
    return {
        "snapshots": ["snapshots"],
        "forget --keep-last 5 --dry-run": ["forget", "--keep-last", "5", "--dry-run"],
        "forget --keep-daily.. --dry-run": ["forget", "--keep-daily", "7", "--keep-weekly", "5",
                                            "--keep-monthly", "12", "--keep-yearly", "3", "--dry-run"],
        "diff A B": ["diff", a[:8], b[:8]],
        "report --json": ["--json", "report"],
    }


def measure(repo_dir: Path, cache: Path, argv: list[str], repeat: int, src: Path) -> list[float]:
    # Bytecode as an installation has it, in a cache of each source tree's own (the untimed
    # first run writes it), whatever the environment says: else a tree that happens to hold
    # __pycache__ starts 0.2 s faster than one that does not.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DELTAVAULT_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(DELTAVAULT_REPOSITORY=str(repo_dir), DELTAVAULT_PASSWORD=PASSWORD.decode(),
               DELTAVAULT_CACHE_DIR=str(cache), PYTHONPATH=str(src),
               PYTHONPYCACHEPREFIX=str(repo_dir.parent / "pycache" / str(src).strip("/").replace("/", "_")))
    cmd = [sys.executable, "-m", "deltavault", *argv]
    times = []
    for i in range(repeat + 1):  # the first run warms the cache and is not counted
        t = time.monotonic()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        dt = time.monotonic() - t
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr[-2000:]}")
        if i:
            times.append(dt)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshots", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dv-scale-snapshots"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale_snapshots.json")
    ap.add_argument("--label", default="run", help="the key these figures go under in --out")
    ap.add_argument("--src", type=Path, default=ROOT / "src",
                    help="the deltavault source tree the timed commands run (default: this one; "
                    "an older checkout's src gives the 'before' figures on the same repository)")
    ap.add_argument("--only", action="append", default=[], help="only commands starting with this")
    args = ap.parse_args()
    repo_dir, cache, a, b = build(args.work, args.snapshots)
    results: dict[str, dict[str, object]] = {}
    print(f"{'command':<34}{'median s':>10}{'min':>8}{'max':>8}")
    for name, argv in commands(a, b).items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        t = measure(repo_dir, cache, argv, args.repeat, args.src.resolve())
        results[name] = {"median_s": round(statistics.median(t), 3), "all_s": [round(x, 3) for x in t]}
        print(f"{name:<34}{statistics.median(t):>10.2f}{min(t):>8.2f}{max(t):>8.2f}", flush=True)
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    old[args.label] = {"when": datetime.now(UTC).isoformat(timespec="minutes"), "snapshots": args.snapshots,
                       "repeat": args.repeat, "src": str(args.src), "load": os.getloadavg()[0], "commands": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(old, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
