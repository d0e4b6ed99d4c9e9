#!/usr/bin/env python3
"""Backup and restore, local and over SFTP: the files-full backup (tree-v1 + db-v1) and its
restore, with a local repository and with an sftp repository on a real OpenSSH server on
127.0.0.1, for deltavault, restic (whose sftp backend pipes through the ssh binary) and borg (which
runs `borg serve` on the host over ssh), in the same run, round by round. Every tool
encrypts and compresses with zstd, with the settings of bench/peers.py (borg repokey-blake2
and zstd,3; restic repository v2 with compression auto), as anchors.sh runs them.

Needs root (restores go to a fresh ext4 on a loop device each time).

Usage: bench/sftp.py --datasets DIR [--repeat N] [--out FILE]
    [--tools deltavault restic borg] [--where local sftp]
    [--profile-restore DIR]  (py-spy records deltavault's sftp restores, a flame graph per round)

With ``--where sftp`` the local backups and restores are skipped (each tool still backs up
into its remote repository, timed, before the restore).
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

from peers import BORG_CREATE, BORG_INIT, DESCRIPTION, RESTIC_BACKUP, RESTIC_INIT  # noqa: E402
from quiesce import child_cpu, compiled, settle, warm  # noqa: E402
from restore_fs import restore_fs  # noqa: E402
from tests.sshd import sshd  # noqa: E402  (the test suite's server, so both run the same sshd)


def restore_timed(argv: list[str], env: dict[str, str], work: Path, repo_dir: Path, *,
                  cwd: bool = False) -> tuple[float, float]:
    """(wall seconds, system CPU seconds) of one restore, to a new ext4 (bench/restore_fs.py).
    Before the clock starts, every tool alike: its repository ``repo_dir`` is read once (held
    in the page cache) and write-back has drained (quiesce.py). borg extracts into its working
    directory (``cwd``); the others take the target last."""
    with restore_fs(work, "3G") as mnt:
        warm(repo_dir)
        settle()
        child_cpu()
        secs = timed(argv, env, cwd=mnt) if cwd else timed([*argv, str(mnt / "out")], env)
        return secs, child_cpu()[1]


def timed(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return time.perf_counter() - t0


def one_round(ds: Path, work: Path, tools: list[str], where: list[str],
              profile: Path | None = None, rnd: int = 0) -> dict[str, float]:
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
        compiled(sys.executable, env)
        places = [("local", str(work / "local-repo")), ("sftp", srv.url(work / "sftp-repo"))]
        dirs = {"local": work / "local-repo", "sftp": work / "sftp-repo"}
        for name, repo in places if "deltavault" in tools else []:
            if name not in where:
                continue
            timed([*dv, "-r", repo, "init"], env)
            settle()
            out[f"deltavault {name} backup"] = timed([*dv, "-r", repo, "backup", *paths], env)
            spy: list[str] = []
            if profile is not None and name == "sftp":
                profile.mkdir(parents=True, exist_ok=True)
                spy = [str(Path(sys.executable).parent / "py-spy"), "record", "-r", "200", "--threads", "--idle", "-f", "raw",
                       "-o", str(profile / f"restore-{rnd}.txt"), "--"]
            out[f"deltavault {name} restore"], out[f"deltavault {name} restore sys"] = restore_timed(
                [*spy, *dv, "-r", repo, "restore", "latest", "--target"], env, work, dirs[name])
        opt = ["-o", f"sftp.command=ssh -F {srv.ssh_config} dvtest -s sftp"]
        restic_places = [("local", str(work / "restic-local")), ("sftp", f"sftp:dvtest:{work}/restic-sftp")]
        for name, repo in restic_places if "restic" in tools else []:
            if name not in where:
                continue
            timed(["restic", "-r", repo, *opt, "init", *RESTIC_INIT], env)
            settle()
            out[f"restic {name} backup"] = timed(["restic", "-r", repo, *opt, "backup", "-q", *RESTIC_BACKUP, *paths], env)
            out[f"restic {name} restore"], out[f"restic {name} restore sys"] = restore_timed(
                ["restic", "-r", repo, *opt, "restore", "latest", "-q", "--target"], env, work,
                work / f"restic-{name}")
        # borg 1.2 has no sftp backend: remotely it runs `borg serve` on the host over ssh.
        env.update(BORG_RSH=f"ssh -F {srv.ssh_config}", BORG_BASE_DIR=str(work / "borg-base"),
                   BORG_PASSPHRASE="bench")
        borg_places = [("local", str(work / "borg-local")), ("ssh", f"ssh://dvtest{work}/borg-ssh")]
        for name, repo in borg_places if "borg" in tools else []:
            if {"ssh": "sftp"}.get(name, name) not in where:
                continue
            timed(["borg", "init", *BORG_INIT, repo], env)
            settle()
            out[f"borg {name} backup"] = timed(["borg", "create", *BORG_CREATE, f"{repo}::a", *paths], env)
            out[f"borg {name} restore"], out[f"borg {name} restore sys"] = restore_timed(
                ["borg", "extract", f"{repo}::a"], env, work, work / f"borg-{name}", cwd=True)
    return out


def ratios_per_round_summary(per_round: dict[str, list[float]], ratios: dict[str, float]) -> dict[str, str]:
    return {k: f"{ratios[k]} (rounds {', '.join(map(str, v))})" for k, v in per_round.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "sftp.json")
    ap.add_argument("--tools", nargs="+", default=["deltavault", "restic", "borg"],
                    choices=["deltavault", "restic", "borg"])
    ap.add_argument("--where", nargs="+", default=["local", "sftp"], choices=["local", "sftp"])
    ap.add_argument("--profile-restore", type=Path, help="folder for py-spy profiles of the sftp restores")
    a = ap.parse_args()
    rounds = []
    for i in range(a.repeat):
        work = Path(tempfile.mkdtemp(prefix="dv-sftp-bench-", dir="/tmp"))
        try:
            rounds.append(one_round(a.datasets, work, a.tools, a.where, a.profile_restore, i + 1))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in rounds[-1].items()), flush=True)
    medians = {k: round(statistics.median(r[k] for r in rounds), 2) for k in rounds[0]}
    per_round = {f"{op} {where} / {peer} {pwhere}": [
        round(r[f"deltavault {where} {op}"] / r[f"{peer} {pwhere} {op}"], 2) for r in rounds]
        for op in ("backup", "restore")
        for where, peer, pwhere in (("local", "restic", "local"), ("sftp", "restic", "sftp"),
                                    ("local", "borg", "local"), ("sftp", "borg", "ssh"))
        if f"deltavault {where} {op}" in rounds[0] and f"{peer} {pwhere} {op}" in rounds[0]}
    ratios = {k: statistics.median(v) for k, v in per_round.items()}
    # The stability target: slowest round over fastest, per tool and operation.
    spread = {k: round(max(r[k] for r in rounds) / min(r[k] for r in rounds), 2)
              for k in rounds[0] if not k.endswith(" sys")}
    result = {"rounds": rounds, "medians": medians, "ratios": ratios, "ratios_per_round": per_round,
              "max_over_min": spread, "load_average": os.getloadavg(),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "peer_settings": DESCRIPTION}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"medians": medians, "ratios": ratios_per_round_summary(per_round, ratios),
                      "max_over_min": spread, "load_average": result["load_average"]}, indent=1))


if __name__ == "__main__":
    main()
