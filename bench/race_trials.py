#!/usr/bin/env python3
"""Randomized race trials: restore and sync into a tree another local user attacks.

Each trial runs a restore (or a sync) of ``testing.hostile.rich_tree`` (files, hard links
across directories, symlinks, FIFOs, device nodes, setuid files, xattrs, ACLs, every
directory mode 0777) while an ``Attacker`` (uid nobody, seeded by the trial number) swaps
entries of the target for symlinks to root-only objects outside it, reacting to inotify
events within microseconds, moves directories and plants symlinks and hard links. Half of
the trials write into an empty target (only its root is open to the attacker), half over
the previous trial's copy (every directory open). After each trial the objects outside
(``Outside``: a root-only file, a directory, a FIFO, a device node, a file with xattrs and
an ACL, and root-only files under the names the tree uses) must be exactly as before:
mode, owner, link count, size, times, content, xattrs.

    flock /tmp/dv-bench.lock .venv/bin/python bench/race_trials.py [--trials 1000] [--kind restore|sync|both]

Prints JSON and writes bench/results/race_trials.json; docs/security.md quotes it. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from deltavault.backends.local import LocalBackend  # noqa: E402
from deltavault.backup.files.run import BackupRequest, run_backup  # noqa: E402
from deltavault.repository.repository import Repository  # noqa: E402
from deltavault.restore.files import FileRestorer  # noqa: E402
from deltavault.restore.options import RestoreOptions  # noqa: E402
from deltavault.sync.local.engine import Syncer  # noqa: E402
from deltavault.sync.options import SyncOptions  # noqa: E402
from deltavault.testing.hostile import Outside, attacked, mirror_names, rich_tree  # noqa: E402

Trial = Callable[[Path], list[str]]  # writes into the target; returns the problems it reported


def _fresh(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o777)
    path.chmod(0o777)


def _recreate(outside: Outside) -> None:
    shutil.rmtree(outside.root)
    fresh = Outside.create(outside.root)
    mirror_names(fresh)
    assert [str(t) for t in fresh.targets] == [str(t) for t in outside.targets]


def restore_trial(work: Path, src: Path) -> Trial:
    repo = Repository.init(LocalBackend(work / "repo", fsync=False), b"race trials", cache_root=work / "cache")
    tree = run_backup(repo, BackupRequest(paths=[str(src)], hostname="race")).snapshot.tree
    assert tree is not None

    def trial(target: Path) -> list[str]:
        r = FileRestorer(repo, target, RestoreOptions())
        r.run(tree)
        return [p.message for p in r.problems]
    return trial


def sync_trial(src: Path) -> Trial:
    def trial(target: Path) -> list[str]:
        opts = SyncOptions(delete=True, acl=True, xattrs=True, processes=1)
        res = Syncer(src, target, opts).run()
        return [p.message for p in res.problems]
    return trial


def run_trials(kind: str, trial: Trial, work: Path, outside: Outside, trials: int) -> dict[str, object]:
    before = outside.state()
    touched: list[dict[str, object]] = []
    moves: dict[str, int] = {}
    replaced = 0
    problems = 0
    t0 = time.monotonic()
    for n in range(trials):
        target = work / f"{kind}-target"
        if n % 2 == 0:
            _fresh(target)
        with attacked(target, outside, seed=n) as attacker:
            found = trial(target)
        for k, v in attacker.moves.items():
            moves[k] = moves.get(k, 0) + v
        problems += len(found)
        replaced += sum("replaced" in m or "symbolic link" in m.lower() for m in found)
        changes = outside.changes(before)
        if changes:
            touched.append({"trial": n, "changes": changes[:5]})
            _recreate(outside)  # the next trial starts from intact objects again
            before = outside.state()
        if (n + 1) % 100 == 0:
            print(f"{kind}: {n + 1} trials, {len(touched)} touched outside, {sum(moves.values())} attacker moves",
                  file=sys.stderr)
    return {"kind": kind, "trials": trials, "trials_touching_outside": len(touched), "touched": touched[:20],
            "attacker_moves": sum(moves.values()), "moves_by_kind": moves, "problems_reported": problems,
            "entries_refused_as_replaced": replaced, "seconds": round(time.monotonic() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--kind", choices=["restore", "sync", "both"], default="both")
    ap.add_argument("--dirs", type=int, default=8, help="directories in the source tree")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "race_trials.json")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("race_trials: needs root (the attacker runs as nobody, the outside objects are root's)")
    work = Path(tempfile.mkdtemp(prefix="dv-race-", dir="/tmp"))
    work.chmod(0o755)
    try:
        src = work / "src"
        rich_tree(src, dirs=a.dirs)
        outside = Outside.create(work / "outside")
        mirror_names(outside)
        kinds = ["restore", "sync"] if a.kind == "both" else [a.kind]
        results = []
        for kind in kinds:
            trial = restore_trial(work, src) if kind == "restore" else sync_trial(src)
            results.append(run_trials(kind, trial, work, outside, a.trials))
        out = {"when": time.strftime("%Y-%m-%d"), "source_dirs": a.dirs, "results": results}
        print(json.dumps(out, indent=2))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
