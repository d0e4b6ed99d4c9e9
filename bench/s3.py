#!/usr/bin/env python3
"""Backup and restore to S3: files-full (tree-v1 + db-v1), files-incr (then tree-v2 + db-v2,
staged as anchors.sh stages them) and a full restore of the files-full snapshot, for
deltavault and restic's S3 backend, against one SeaweedFS on 127.0.0.1 (the test suite's,
tests/seaweed.py), in the same run, round by round. Both encrypt and compress with zstd
(deltavault: AES-256-GCM, zstd 'auto'; restic: bench/peers.py, repository v2 and
compression auto, its defaults, named).

Timed rounds talk to the server directly. One more round goes through the counting proxy of
the tests (tests/s3proxy.py), the same instrument for both tools, for the requests and the
bytes sent and received per run (its own overhead makes its times meaningless, so they are
not reported). Needs root (each restore goes to a fresh ext4 on a loop device).

With ``--only restore``: each tool backs up files-full once, then restores it in rounds,
the order of the tools rotating each round, then once more through the proxy, counted.
``--base SRC`` adds the deltavault of another source tree (its ``src/``) restoring the same
repository, for old against new code in one session.

``--bytecode``: deltavault's compiled modules are cached (in the work directory) and reused
from run to run, as an installed package has them; without it, an inherited
PYTHONDONTWRITEBYTECODE makes every run compile what it imports.

Usage: bench/s3.py --datasets DIR [--repeat N] [--out FILE] [--only restore [--base SRC]] [--bytecode]
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
from tests.loopdev import fresh_fs  # noqa: E402
from tests.s3proxy import proxy  # noqa: E402
from tests.seaweed import Seaweed, server  # noqa: E402

OPS = ("files-full", "files-incr", "restore")
LAST_RSS_MB = 0.0  # peak RSS of the last command timed
LAST_CPU_S = 0.0  # its user + system CPU seconds (the tool's own and its reaped children's)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def stage(ds: Path, src: Path, version: str) -> None:
    """As anchors.sh: rsync keeps the inodes of unchanged files, the database is patched in place."""
    (src / "tree").mkdir(parents=True, exist_ok=True)
    sh("rsync", "-a", "--delete", f"{ds}/tree-{version}/", f"{src}/tree/")
    sh("rsync", "-a", "--inplace", "--no-whole-file", f"{ds}/db-{version}.sqlite", f"{src}/db.sqlite")


def timed(argv: list[str], env: dict[str, str]) -> float:
    sh("sync")
    global LAST_RSS_MB, LAST_CPU_S
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        _pid, status, usage = os.wait4(p.pid, 0)  # the child's own peak RSS, not the largest child's
        secs = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            out.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}):\n{out.read()[-4000:].decode(errors='replace')}")
    LAST_RSS_MB = round(usage.ru_maxrss / 1024, 1)  # KiB on Linux
    LAST_CPU_S = round(usage.ru_utime + usage.ru_stime, 2)
    return secs


def restore_timed(argv: list[str], env: dict[str, str], work: Path) -> float:
    """To a new ext4 each time (a file system that just deleted 10k files slows every tool)."""
    scratch = work / "restore-fs"
    scratch.mkdir()
    try:
        with fresh_fs(scratch, "3G", "mkfs.ext4", "-q", "-F") as mnt:
            return timed([*argv, str(mnt / "out")], env)
    finally:
        shutil.rmtree(scratch)


def commands(tool: str, url: str, paths: list[str]) -> dict[str, list[str]]:
    if tool == "deltavault":
        dv = [sys.executable, "-m", "deltavault", "-r", url]
        return {"init": [*dv, "init"], "backup": [*dv, "backup", *paths],
                "restore": [*dv, "restore", "{id}", "--target"]}
    r = ["restic", "-r", url, "-o", "s3.bucket-lookup=path"]
    return {"init": [*r, "init", *RESTIC_INIT], "backup": [*r, "backup", "-q", *RESTIC_BACKUP, *paths],
            "restore": [*r, "restore", "{id}", "-q", "--target"]}


BYTECODE = False  # --bytecode: deltavault's modules compiled once, as an installed package has them


def tool_env(sw: Seaweed, work: Path, bucket: str, src: Path = ROOT / "src") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAVAULT_", "RESTIC_", "AWS_"))}
    if BYTECODE:
        # With PYTHONDONTWRITEBYTECODE inherited, every run compiled the modules it imports
        # (0.1-0.2 s of CPU) from a source tree, where pip's install would have bytecode.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")  # not in the source trees
    env.update(sw.env(), DELTAVAULT_PASSWORD="bench", DELTAVAULT_CACHE_DIR=str(work / "cache" / bucket),
               RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(work / "restic-cache" / bucket),
               PYTHONPATH=str(src))  # this tree's deltavault, not the venv's editable install
    return env


def one_round(ds: Path, work: Path, sw: Seaweed, endpoint: str, *, counter: object = None) -> dict[str, dict]:
    """Every tool, every op, on fresh buckets; {tool op: {"seconds": s, requests...}}."""
    out: dict[str, dict] = {}
    for tool in ("deltavault", "restic"):
        src = work / "src"
        shutil.rmtree(src, ignore_errors=True)
        stage(ds, src, "v1")
        bucket = sw.new_bucket()
        url = f"s3:{endpoint}/{bucket}/{tool}"
        env = tool_env(sw, work, bucket)
        cmd = commands(tool, url, [str(src / "tree"), str(src / "db.sqlite")])
        timed(cmd["init"], env)
        for op in OPS:
            if op == "files-incr":
                stage(ds, src, "v2")
            before = counter.snapshot() if counter is not None else None  # type: ignore[attr-defined]
            if op == "restore":
                # the files-full snapshot: restore by the first snapshot's id
                first = _first_snapshot(tool, url, env)
                secs = restore_timed([x.replace("{id}", first) for x in cmd["restore"]], env, work)
            else:
                secs = timed(cmd["backup"], env)
            row: dict = {"seconds": round(secs, 2)}
            if counter is not None:
                d = counter.snapshot().since(before)  # type: ignore[attr-defined]
                row.update(requests=d.requests, sent=d.sent, received=d.received,
                           by_method=dict(d.by_method))
            out[f"{tool} {op}"] = row
        shutil.rmtree(work / "cache", ignore_errors=True)
        shutil.rmtree(work / "restic-cache", ignore_errors=True)
    return out


def restore_rounds(ds: Path, work: Path, sw: Seaweed, repeat: int, base: Path | None) -> tuple[list, dict]:
    """One backup per tool, then ``repeat`` timed restores of it per variant (deltavault,
    deltavault-base from ``base``, restic), their order rotating each round, then one counted
    restore each through the proxy. Returns (rounds, counted)."""
    src = work / "src"
    stage(ds, src, "v1")
    repos: dict[str, tuple[str, str, str]] = {}  # tool -> (bucket, path in it, snapshot id)
    for tool in ("deltavault", "restic"):
        bucket = sw.new_bucket()
        env = tool_env(sw, work, bucket)
        cmd = commands(tool, f"s3:{sw.endpoint}/{bucket}/{tool}", [str(src / "tree"), str(src / "db.sqlite")])
        timed(cmd["init"], env)
        timed(cmd["backup"], env)
        repos[tool] = (bucket, f"{bucket}/{tool}", _first_snapshot(tool, f"s3:{sw.endpoint}/{bucket}/{tool}", env))
    variants = [("deltavault", "deltavault", ROOT / "src"), ("restic", "restic", ROOT / "src")]
    if base is not None:
        variants.insert(1, ("deltavault-base", "deltavault", base))

    def restore(name: str, tool: str, code: Path, endpoint: str) -> float:
        bucket, path, sid = repos[tool]
        cmd = commands(tool, f"s3:{endpoint}/{path}", [])["restore"]
        return restore_timed([x.replace("{id}", sid) for x in cmd], tool_env(sw, work, bucket, code), work)

    if BYTECODE:  # each variant's first run compiles its modules: not timed
        for name, tool, code in variants:
            if tool == "deltavault":
                restore(name, tool, code, sw.endpoint)
    rounds = []
    for i in range(repeat):
        row = {}
        for name, tool, code in variants[i % len(variants):] + variants[:i % len(variants)]:
            row[f"{name} restore"] = {"seconds": round(restore(name, tool, code, sw.endpoint), 2),
                                      "peak_rss_mb": LAST_RSS_MB, "cpu_s": LAST_CPU_S}
        rounds.append(row)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v['seconds']:.2f} s {v['cpu_s']:.2f} CPU-s {v['peak_rss_mb']} MB"
                                             for k, v in row.items()), flush=True)
    counted = {}
    with proxy(sw.s3_port) as p:
        for name, tool, code in variants:
            before = p.snapshot()
            restore(name, tool, code, p.endpoint)
            d = p.snapshot().since(before)
            counted[f"{name} restore"] = {"requests": d.requests, "sent": d.sent, "received": d.received,
                                          "by_method": dict(d.by_method)}
    return rounds, counted


def _first_snapshot(tool: str, url: str, env: dict[str, str]) -> str:
    if tool == "deltavault":
        p = subprocess.run([sys.executable, "-m", "deltavault", "-r", url, "--json", "snapshots"], env=env,
                           capture_output=True, text=True, check=True)
        snaps = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
        return str(min(snaps, key=lambda s: s["time"])["id"])
    p = subprocess.run(["restic", "-r", url, "-o", "s3.bucket-lookup=path", "snapshots", "--json"], env=env,
                       capture_output=True, text=True, check=True)
    return str(min(json.loads(p.stdout), key=lambda s: s["time"])["short_id"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "s3.json")
    ap.add_argument("--only", choices=["restore"], help="only the restore: one backup per tool, restored in rounds")
    ap.add_argument("--base", type=Path, help="with --only restore: also the deltavault of this src/ directory")
    ap.add_argument("--bytecode", action="store_true",
                    help="let deltavault cache its compiled modules (in the work directory), as an install has")
    a = ap.parse_args()
    global BYTECODE
    BYTECODE = a.bytecode
    size = sum(p.stat().st_size for p in (a.datasets / "tree-v1").rglob("*") if p.is_file()) + \
        (a.datasets / "db-v1.sqlite").stat().st_size
    rounds = []
    work = Path(tempfile.mkdtemp(prefix="dv-s3-bench-", dir="/tmp"))
    ops = OPS
    try:
        with server(work / "seaweed") as sw:
            if a.only == "restore":
                ops = ("restore",)
                rounds, counted = restore_rounds(a.datasets, work, sw, a.repeat, a.base)
            for i in range(a.repeat if a.only is None else 0):
                rounds.append(one_round(a.datasets, work, sw, sw.endpoint))
                print(f"round {i + 1}: " + ", ".join(f"{k} {v['seconds']:.2f}" for k, v in rounds[-1].items()),
                      flush=True)
            if a.only is None:
                with proxy(sw.s3_port) as p:
                    counted = one_round(a.datasets, work, sw, p.endpoint, counter=p)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {k: round(statistics.median(r[k]["seconds"] for r in rounds), 2) for k in rounds[0]}
    cpu = {k: round(statistics.median(r[k]["cpu_s"] for r in rounds), 2) for k in rounds[0] if "cpu_s" in rounds[0][k]}
    gb = size / 1e9
    ratios = {op: round(statistics.median(r[f"restic {op}"]["seconds"] / r[f"deltavault {op}"]["seconds"]
                                          for r in rounds), 2) for op in ops}
    if a.base is not None and a.only == "restore":
        ratios["restore, base / this tree"] = round(statistics.median(
            r["deltavault-base restore"]["seconds"] / r["deltavault restore"]["seconds"] for r in rounds), 2)
    traffic = {k: {"requests": v["requests"], "requests_per_gb": round(v["requests"] / gb, 1),
                   "sent_mb": round(v["sent"] / 1e6, 1), "received_mb": round(v["received"] / 1e6, 1),
                   "by_method": v["by_method"]} for k, v in counted.items()}
    result = {"dataset_bytes": size, "rounds": rounds, "medians_seconds": medians, "medians_cpu_s": cpu,
              "speedup_over_restic": ratios, "traffic": traffic,
              "throughput_mb_s": {k: round(size / 1e6 / v, 1) for k, v in medians.items() if "incr" not in k},
              "restic": subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.strip(),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average": os.getloadavg(), "bytecode_cached": a.bytecode}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("medians_seconds", "medians_cpu_s", "speedup_over_restic", "throughput_mb_s",
                                             "traffic")}, indent=1))


if __name__ == "__main__":
    main()
