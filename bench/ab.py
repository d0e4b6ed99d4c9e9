#!/usr/bin/env python3
"""Two revisions of deltavault on the same scenarios, interleaved in one run.

A refactoring must not cost speed; this says whether it did, on a noisy machine, by running
revision A and revision B alternately (A B B A, round after round) on the shared datasets:
files-full (tree-v1 + db-v1), files-incr (then v2), restore of the incremental, image-full
(disk-v1.img), image-incr (disk-v2.img). Each run is a fresh CLI process whose wall time,
user+sys CPU and peak RSS (wait4) are recorded; the table gives medians and B/A ratios.

    bench/ab.py --datasets ../data/ds --a main~3 --b main [--rounds 3] [--scenarios files image]

Each revision is checked out with ``git worktree`` under --work and run with its own src/
first on PYTHONPATH (the installed dependencies are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.files import stage  # noqa: E402


@dataclass
class Run:
    seconds: float
    cpu: float
    rss_mib: float


def run(src: Path, env: dict[str, str], *args: str) -> Run:
    """One deltavault command of the revision whose src/ is ``src``; its own rusage (wait4)."""
    e = dict(env, PYTHONPATH=str(src))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "deltavault", "--json", *args], env=e, stdout=out, stderr=err)
        _pid, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            out.seek(0)
            err.seek(0)
            raise SystemExit(f"{src}: deltavault {' '.join(args)} failed ({p.returncode}):\n"
                             f"{out.read().decode()[-2000:]}{err.read().decode()[-2000:]}")
    return Run(dt, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024)


def files_scenarios(rev: Path, ds: Path, work: Path, env: dict[str, str]) -> dict[str, Run]:
    shutil.rmtree(work, ignore_errors=True)
    src, repo = work / "src", work / "repo"
    work.mkdir(parents=True)
    stage(ds, src, "v1")
    run(rev, env, "-r", str(repo), "init")
    out = {}
    subprocess.run(["sync"], check=True)
    out["files-full"] = run(rev, env, "-r", str(repo), "backup", str(src / "tree"), str(src / "db.sqlite"))
    stage(ds, src, "v2")
    subprocess.run(["sync"], check=True)
    out["files-incr"] = run(rev, env, "-r", str(repo), "backup", str(src / "tree"), str(src / "db.sqlite"))
    out["restore"] = run(rev, env, "-r", str(repo), "restore", "latest", "--target", str(work / "out"))
    shutil.rmtree(work, ignore_errors=True)
    return out


def image_scenarios(rev: Path, ds: Path, work: Path, env: dict[str, str]) -> dict[str, Run]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    img, repo = work / "disk.img", work / "repo"
    subprocess.run(["cp", "--sparse=always", str(ds / "disk-v1.img"), str(img)], check=True)
    run(rev, env, "-r", str(repo), "init")
    out = {"image-full": run(rev, env, "-r", str(repo), "backup", "--volume", str(img))}
    subprocess.run(["cp", "--sparse=always", str(ds / "disk-v2.img"), str(img)], check=True)
    subprocess.run(["sync"], check=True)
    out["image-incr"] = run(rev, env, "-r", str(repo), "backup", "--volume", str(img))
    shutil.rmtree(work, ignore_errors=True)
    return out


def checkout(rev: str, where: Path) -> Path:
    if where.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), rev], check=True)
    return where / "src"


def revision_args(doc: str, name: str, rounds: int) -> argparse.ArgumentParser:
    """The options of a bench comparing two revisions: datasets, the revisions, rounds, and
    the work folder and output file named after the bench."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--a", required=True, help="the revision before")
    ap.add_argument("--b", default="HEAD", help="the revision after (default HEAD)")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--work", type=Path, default=Path(f"/tmp/dv-bench-{name}"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / f"{name}.json")
    return ap


def finish(a: argparse.Namespace, result: dict[str, object]) -> None:
    """Prints and writes the result, and removes the two revisions' worktrees."""
    print(json.dumps(result, indent=2))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    for who in ("a", "b"):
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(a.work / f"rev-{who}")],
                       check=False)


def main() -> None:
    ap = revision_args(__doc__, "ab", 3)
    ap.add_argument("--scenarios", nargs="*", default=["files", "image"], choices=["files", "image"])
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env.update(DELTAVAULT_PASSWORD="bench", DELTAVAULT_CACHE_DIR=str(a.work / "cache"))
    revs = {"A": checkout(a.a, a.work / "rev-a"), "B": checkout(a.b, a.work / "rev-b")}
    runs: dict[str, dict[str, list[Run]]] = {"A": {}, "B": {}}
    for rnd in range(a.rounds):
        order = ["A", "B"] if rnd % 2 == 0 else ["B", "A"]
        for kind in a.scenarios:
            for who in order:
                shutil.rmtree(a.work / "cache", ignore_errors=True)
                fn = files_scenarios if kind == "files" else image_scenarios
                for scen, r in fn(revs[who], a.datasets, a.work / "run", env).items():
                    runs[who].setdefault(scen, []).append(r)
                    print(f"round {rnd + 1} {who} {scen}: {r.seconds:.2f} s, {r.cpu:.2f} CPU-s, "
                          f"{r.rss_mib:.0f} MiB", file=sys.stderr)
    table = []
    for scen in runs["A"]:
        row: dict[str, object] = {"scenario": scen}
        for who in ("A", "B"):
            rs = runs[who][scen]
            row[who] = {"seconds": round(statistics.median(r.seconds for r in rs), 2),
                        "cpu": round(statistics.median(r.cpu for r in rs), 2),
                        "rss_mib": round(statistics.median(r.rss_mib for r in rs)),
                        "all_seconds": [round(r.seconds, 2) for r in rs]}
        row["b_over_a"] = round(row["B"]["seconds"] / row["A"]["seconds"], 3)  # type: ignore[index]
        table.append(row)
    result = {"a": a.a, "b": a.b, "rounds": a.rounds, "when": time.strftime("%Y-%m-%d %H:%M"), "table": table}
    finish(a, result)


if __name__ == "__main__":
    main()
