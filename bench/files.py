#!/usr/bin/env python3
"""File backup benchmark: deltavault against the peers on the shared datasets.

Scenarios follow ../shared/bench/anchors.sh exactly: files-full backs up tree-v1 + db-v1,
files-incr then backs up tree-v2 + db-v2, staged the same way (rsync keeps inodes of
unchanged files, the database is updated in place). "bytes added" is the growth of the
repository directory, as anchors.sh measures it. The peers are timed by anchors.sh itself,
interleaved with our runs, so the ratios compare runs on the same machine state. anchors.sh
runs them on bench/peers.py's settings (borg repokey-blake2 + zstd,3; restic encrypted,
compression auto); the run stops if it does not.

Also: a no-change incremental over 100k files (wall time of the whole command).

Usage: bench/files.py --datasets DIR [--work DIR] [--repeat N] [--out FILE] [--peers restic borg]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = ROOT.parent / "shared" / "bench" / "anchors.sh"
sys.path.insert(0, str(ROOT / "bench"))

from peers import BORG_CREATE, BORG_INIT  # noqa: E402


def sh(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


def du(path: Path) -> int:
    return int(sh("du", "-sb", str(path)).stdout.split()[0]) if path.exists() else 0


def stage(ds: Path, src: Path, version: str) -> None:
    (src / "tree").mkdir(parents=True, exist_ok=True)
    sh("rsync", "-a", "--delete", f"{ds}/tree-{version}/", f"{src}/tree/")
    sh("rsync", "-a", "--inplace", "--no-whole-file", f"{ds}/db-{version}.sqlite", f"{src}/db.sqlite")


def dv_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env.update(DELTAVAULT_PASSWORD="bench", DELTAVAULT_CACHE_DIR=str(work / "cache"))
    return env


def dv(work: Path, *args: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "deltavault", "--json", *args], env=dv_env(work),
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"deltavault {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    return dt, (lines[-1] if lines else {})


def deltavault_files(ds: Path, work: Path, *, encrypted: bool = True) -> dict[str, dict]:
    shutil.rmtree(work, ignore_errors=True)
    src, repo = work / "src", work / "t" / "repo"
    (work / "t").mkdir(parents=True)
    stage(ds, src, "v1")
    repo_args = ["-r", str(repo)] + ([] if encrypted else ["--insecure-no-encryption"])
    dv(work, *repo_args, "init")
    out: dict[str, dict] = {}
    for scen, version in (("files-full", "v1"), ("files-incr", "v2")):
        if version == "v2":
            stage(ds, src, "v2")
        before = du(work / "t")
        sh("sync")
        secs, summary = dv(work, *repo_args, "backup", str(src / "tree"), str(src / "db.sqlite"))
        out[scen] = {"seconds": round(secs, 2), "bytes_added": du(work / "t") - before,
                     "bytes_read": summary.get("bytes_read"), "bytes_downloaded": summary.get("bytes_downloaded"),
                     "change_source": summary.get("change_source")}
    secs, summary = dv(work, *repo_args, "backup", str(src / "tree"), str(src / "db.sqlite"))
    out["files-nochange"] = {"seconds": round(secs, 2), "bytes_read": summary.get("bytes_read"),
                             "bytes_downloaded": summary.get("bytes_downloaded")}
    shutil.rmtree(work, ignore_errors=True)
    return out


def check_anchor_settings() -> None:
    """The peer rows come from anchors.sh: refuse to run if it no longer uses the settings of
    bench/peers.py (borg repokey-blake2 + zstd,3), so that every peer run in bench/ is on
    equal settings (issue #18). restic there runs with its defaults, which are peers.py's."""
    text = ANCHORS.read_text()
    for tool, args in (("borg init", BORG_INIT), ("borg create", BORG_CREATE)):
        if " ".join(args) not in text:
            raise SystemExit(f"{ANCHORS} no longer runs {tool} with {' '.join(args)} (bench/peers.py): "
                             "its rows would not be on equal settings")


def anchors(ds: Path, work: Path, tools: list[str]) -> dict[tuple[str, str], dict]:
    check_anchor_settings()
    shutil.rmtree(work, ignore_errors=True)
    p = subprocess.run(["bash", str(ANCHORS), str(ds), str(work), *tools], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"anchors.sh failed:\n{p.stderr}")
    out = {}
    for line in p.stdout.splitlines():
        tool, scen, secs, added = line.split("\t")
        out[(tool, scen)] = {"seconds": float(secs), "bytes_added": int(added)}
    shutil.rmtree(work, ignore_errors=True)
    return out


def hundred_k(work: Path, repeat: int) -> dict:
    """No-change incremental over 100,000 files: wall time of the whole command."""
    src = work / "100k"
    rnd = random.Random(1)
    for d in range(1000):
        p = src / f"d{d // 100:02d}" / f"s{d:04d}"
        p.mkdir(parents=True, exist_ok=True)
        for f in range(100):
            (p / f"f{f:03d}.txt").write_bytes(rnd.randbytes(rnd.randint(0, 2000)))
    repo = work / "repo100k"
    dv(work, "-r", str(repo), "init")
    time.sleep(2.1)
    first, _ = dv(work, "-r", str(repo), "backup", str(src))
    times = []
    summary: dict = {}
    for _ in range(repeat):
        secs, summary = dv(work, "-r", str(repo), "backup", str(src))
        times.append(secs)
    shutil.rmtree(work, ignore_errors=True)
    return {"files": 100_000, "full_seconds": round(first, 2), "nochange_seconds": [round(t, 2) for t in times],
            "nochange_median": round(statistics.median(times), 2),
            "files_unmodified": summary.get("files_unmodified"), "bytes_read": summary.get("bytes_read"),
            "bytes_downloaded": summary.get("bytes_downloaded")}


def median_of(runs: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dv-bench-files"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peers", nargs="*", default=["restic", "borg"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "files.json")
    ap.add_argument("--skip-100k", action="store_true")
    a = ap.parse_args()
    ds = a.datasets.resolve()
    runs: dict[str, list[dict]] = {}
    for i in range(a.repeat):
        print(f"round {i + 1}/{a.repeat}: peers", file=sys.stderr, flush=True)
        for (tool, scen), v in anchors(ds, a.work / "anchors", a.peers).items():
            if scen.startswith("files"):
                runs.setdefault(f"{tool}:{scen}", []).append(v)
        print(f"round {i + 1}/{a.repeat}: deltavault", file=sys.stderr, flush=True)
        for scen, v in deltavault_files(ds, a.work / "dv").items():
            runs.setdefault(f"deltavault:{scen}", []).append(v)
        for scen, v in deltavault_files(ds, a.work / "dv-plain", encrypted=False).items():
            runs.setdefault(f"deltavault-unencrypted:{scen}", []).append(v)
    result: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeat": a.repeat,
                    "cpus": os.cpu_count(), "runs": runs, "median": {}}
    for key, rs in runs.items():
        result["median"][key] = {"seconds": median_of(rs, "seconds"),
                                 **({"bytes_added": int(median_of(rs, "bytes_added"))} if "bytes_added" in rs[0] else {})}
    if not a.skip_100k:
        print("100k files no-change", file=sys.stderr, flush=True)
        result["nochange_100k"] = hundred_k(a.work / "100k", a.repeat)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["median"], indent=2))
    if "nochange_100k" in result:
        print(json.dumps(result["nochange_100k"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
