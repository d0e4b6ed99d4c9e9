#!/usr/bin/env python3
"""SFTP backend benchmark: the files-full backup (tree-v1 + db-v1) and its restore, to a local
repository and to an sftp repository on a real OpenSSH server on 127.0.0.1, beside restic's
sftp backend (which pipes through the ssh binary), in the same run, round by round.

Usage: bench/sftp.py --datasets DIR [--repeat N] [--out FILE]
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

from tests.sshd import sshd  # noqa: E402  (the test suite's server, so both run the same sshd)


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return time.perf_counter() - t0


def one_round(ds: Path, work: Path) -> dict[str, float]:
    src = work / "src"
    (src / "tree").mkdir(parents=True)
    subprocess.run(["rsync", "-a", f"{ds}/tree-v1/", f"{src}/tree/"], check=True)
    shutil.copyfile(ds / "db-v1.sqlite", src / "db.sqlite")
    paths = [str(src / "tree"), str(src / "db.sqlite")]
    out: dict[str, float] = {}
    with sshd(work) as srv:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAVAULT_", "RESTIC_"))}
        env.update(DELTAVAULT_SSH_CONFIG=str(srv.ssh_config), DELTAVAULT_PASSWORD="bench",
                   DELTAVAULT_CACHE_DIR=str(work / "cache"), RESTIC_PASSWORD="bench",
                   RESTIC_CACHE_DIR=str(work / "restic-cache"))
        dv = [sys.executable, "-m", "deltavault"]
        for name, repo in (("local", str(work / "local-repo")), ("sftp", srv.url(work / "sftp-repo"))):
            timed([*dv, "-r", repo, "init"], env)
            subprocess.run(["sync"], check=True)
            out[f"deltavault {name} backup"] = timed([*dv, "-r", repo, "backup", *paths], env)
            out[f"deltavault {name} restore"] = timed(
                [*dv, "-r", repo, "restore", "latest", "--target", str(work / f"out-{name}")], env)
            shutil.rmtree(work / f"out-{name}")
        repo = f"sftp:dvtest:{work}/restic-repo"
        opt = ["-o", f"sftp.command=ssh -F {srv.ssh_config} dvtest -s sftp"]
        timed(["restic", "-r", repo, *opt, "init"], env)
        subprocess.run(["sync"], check=True)
        out["restic sftp backup"] = timed(["restic", "-r", repo, *opt, "backup", "-q", *paths], env)
        out["restic sftp restore"] = timed(["restic", "-r", repo, *opt, "restore", "latest", "-q",
                                            "--target", str(work / "out-restic")], env)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "sftp.json")
    a = ap.parse_args()
    rounds = []
    for i in range(a.repeat):
        work = Path(tempfile.mkdtemp(prefix="dv-sftp-bench-", dir="/tmp"))
        try:
            rounds.append(one_round(a.datasets, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in rounds[-1].items()), flush=True)
    medians = {k: round(statistics.median(r[k] for r in rounds), 2) for k in rounds[0]}
    ratios = {
        "backup sftp / local": round(statistics.median(r["deltavault sftp backup"] / r["deltavault local backup"] for r in rounds), 2),
        "backup sftp / restic sftp": round(statistics.median(r["deltavault sftp backup"] / r["restic sftp backup"] for r in rounds), 2),
        "restore sftp / restic sftp": round(statistics.median(r["deltavault sftp restore"] / r["restic sftp restore"] for r in rounds), 2),
    }
    result = {"rounds": rounds, "medians": medians, "ratios": ratios,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"medians": medians, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
