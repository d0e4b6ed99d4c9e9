#!/usr/bin/env python3
"""Restores only: files-full (tree-v1 + db-v1) restored by two or more deltavault sources and by
restic, interleaved round by round (the order rotates), from repositories backed up once.
Every restore gets the preparation of bench/sftp.py (a new ext4 on a loop device, the
repository read once, write-back drained: quiesce.py). Needs root.

    bench/restore_ab.py --datasets DIR --src main=/work/main/src --src new=src [--rounds 5]

Per round and tool: wall seconds, user and system CPU seconds and peak RSS (wait4), and the
load average when it started; the summary has medians, max/min and each source's ratio to
restic's restore of the same round.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from peers import RESTIC_BACKUP, RESTIC_INIT  # noqa: E402
from quiesce import compiled, settle, warm  # noqa: E402
from restore_fs import restore_fs  # noqa: E402


def run(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    return {"wall": round(wall, 3), "user": round(ru.ru_utime, 2), "sys": round(ru.ru_stime, 2),
            "rss_mib": ru.ru_maxrss >> 10}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--src", action="append", required=True,
                    help="NAME=PATH of a deltavault src/ (PATH may list folders, as PYTHONPATH does)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "restore_ab.json")
    a = ap.parse_args()
    srcs = dict(s.split("=", 1) for s in a.src)
    work = Path(tempfile.mkdtemp(prefix="dv-restore-ab-", dir="/tmp"))
    try:
        data = work / "src"
        (data / "tree").mkdir(parents=True)
        subprocess.run(["rsync", "-a", f"{a.datasets}/tree-v1/", f"{data}/tree/"], check=True)
        shutil.copyfile(a.datasets / "db-v1.sqlite", data / "db.sqlite")
        paths = [str(data / "tree"), str(data / "db.sqlite")]
        base = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAVAULT_", "RESTIC_"))}
        base.update(DELTAVAULT_PASSWORD="bench", DELTAVAULT_CACHE_DIR=str(work / "cache"),
                    RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(work / "restic-cache"))
        envs = {name: dict(base, PYTHONPATH=os.pathsep.join(str(Path(p).resolve()) for p in src.split(os.pathsep)))
                for name, src in srcs.items()}
        for env in envs.values():
            compiled(sys.executable, env)
        first = next(iter(envs.values()))
        dv_repo, restic_repo = work / "dv-repo", work / "restic-repo"
        dv = [sys.executable, "-m", "deltavault", "-r", str(dv_repo)]
        subprocess.run([*dv, "init"], env=first, check=True, capture_output=True)
        subprocess.run([*dv, "backup", *paths], env=first, check=True, capture_output=True)
        subprocess.run(["restic", "-r", str(restic_repo), "init", "-q", *RESTIC_INIT], env=base, check=True)
        subprocess.run(["restic", "-r", str(restic_repo), "backup", "-q", *RESTIC_BACKUP, *paths], env=base, check=True)
        tools = {name: ([*dv, "restore", "latest", "--target"], env, dv_repo) for name, env in envs.items()}
        tools["restic"] = (["restic", "-r", str(restic_repo), "restore", "latest", "-q", "--target"], base, restic_repo)
        names = list(tools)
        rounds: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for r in range(a.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                argv, env, repo = tools[name]
                with restore_fs(work, "3G") as mnt:
                    warm(repo)
                    settle()
                    load = os.getloadavg()[0]
                    rounds[name].append({**run([*argv, str(mnt / "out")], env), "load": round(load, 2)})
                print(r + 1, name, rounds[name][-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, dict[str, object]] = {}
    for name, rs in rounds.items():
        walls = [x["wall"] for x in rs]
        summary[name] = {"median_wall": statistics.median(walls), "max_over_min": round(max(walls) / min(walls), 2),
                         "median_cpu": round(statistics.median(x["user"] + x["sys"] for x in rs), 2),
                         "median_rss_mib": statistics.median(x["rss_mib"] for x in rs)}
        if name != "restic":
            per = [round(x["wall"] / y["wall"], 2) for x, y in zip(rs, rounds["restic"])]
            summary[name].update(ratio_to_restic_per_round=per, ratio_to_restic=statistics.median(per))
    result = {"rounds": rounds, "summary": summary, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
