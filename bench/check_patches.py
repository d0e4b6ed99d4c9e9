#!/usr/bin/env python3
"""What parsing patches costs ``check --read-data`` (maintenance/patchcheck.py).

One repository holds the benchmark's patched content: db-v1.sqlite then db-v2.sqlite as
the same file (a large file changed in place: ``Patch`` references), and disk-v1.img then
disk-v2.img as the same volume (patched blocks). ``check`` and ``check --read-data`` of
revision A and of revision B then run alternately (A B B A, round after round) on it, each
a fresh CLI process: wall time, user+sys CPU and peak RSS. Each revision's bytecode is
compiled once, into a cache of its own (``PYTHONPYCACHEPREFIX``), before the rounds: a
tree with no ``__pycache__`` (PYTHONDONTWRITEBYTECODE) paid ~70 ms a run compiling.

    bench/check_patches.py --datasets ../data/ds --a /work/main/src --b src [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ab import Run, run  # noqa: E402


def repo_env(work: Path) -> dict[str, str]:
    """This process's environment with a repository, password and cache under ``work``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env.update(DELTAVAULT_REPOSITORY=str(work / "repo"), DELTAVAULT_PASSWORD="bench",
               DELTAVAULT_CACHE_DIR=str(work / "cache"))
    return env


def patched_refs(src: Path, env: dict[str, str]) -> dict[str, int]:
    """How many ``Patch`` references the repository's snapshots hold (files, volume blocks)."""
    code = ("import json, os, sys\n"
            "from deltavault.backends.local import LocalBackend\n"
            "from deltavault.model.content import Patch\n"
            "from deltavault.objects.trees import load_nodes\n"
            "from deltavault.objects.volumes import load_manifest, load_segment_map\n"
            "from deltavault.repository.repository import Repository\n"
            "r = Repository.open(LocalBackend(os.environ['DELTAVAULT_REPOSITORY']), lambda: b'bench')\n"
            "n = {'file': 0, 'block': 0}\n"
            "for _sid, s in r.list_snapshots():\n"
            "    if s.volume:\n"
            "        m = load_manifest(r, s.volume)\n"
            "        for i in range(len(m.segments)):\n"
            "            n['block'] += sum(isinstance(x, Patch) for x in load_segment_map(r, m, i).refs)\n"
            "    else:\n"
            "        todo = [s.tree]\n"
            "        while todo:\n"
            "            for node in load_nodes(r, todo.pop()):\n"
            "                n['file'] += sum(isinstance(x, Patch) for x in node.content)\n"
            "                todo.extend([node.subtree] if node.subtree else [])\n"
            "print(json.dumps(n))\n")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(src)), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--a", type=Path, required=True, help="src/ of revision A")
    ap.add_argument("--b", type=Path, required=True, help="src/ of revision B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "check_patches.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dv-bench-checkpatches-"))
    try:
        env = repo_env(work)
        b = args.b.resolve()
        run(b, env, "init")
        (work / "src").mkdir()
        for v in ("v1", "v2"):
            shutil.copyfile(args.datasets / f"db-{v}.sqlite", work / "src" / "db.sqlite")
            run(b, env, "backup", str(work / "src"))
            shutil.copyfile(args.datasets / f"disk-{v}.img", work / "disk.img")
            run(b, env, "backup", "--volume", str(work / "disk.img"))
        os.unlink(work / "disk.img")
        refs = patched_refs(b, env)
        envs = {}
        for rev in ("a", "b"):
            envs[rev] = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
            envs[rev]["PYTHONPYCACHEPREFIX"] = str(work / f"pycache-{rev}")
            run((args.a if rev == "a" else args.b).resolve(), envs[rev], "check")  # compiles
        rounds: list[dict[str, dict[str, float]]] = []  # "check a", "check --read-data b", ...
        for i in range(args.rounds):
            order = ("a", "b", "b", "a") if i % 2 == 0 else ("b", "a", "a", "b")
            got: dict[str, list[Run]] = {}
            for cmd in (["check"], ["check", "--read-data"]):
                for rev in order:
                    got.setdefault(f"{' '.join(cmd)} {rev}", []).append(
                        run((args.a if rev == "a" else args.b).resolve(), envs[rev], *cmd))
            rounds.append({k: {"seconds": statistics.mean(r.seconds for r in rs),
                               "cpu": statistics.mean(r.cpu for r in rs),
                               "rss_mib": max(r.rss_mib for r in rs)} for k, rs in got.items()})
            print(json.dumps(rounds[-1]), flush=True)
        result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "a": str(args.a), "b": str(args.b),
                  "load_average": os.getloadavg(), "patched_refs": refs, "rounds": rounds,
                  "median": {c: {k: statistics.median(r[c][k] for r in rounds) for k in ("seconds", "cpu", "rss_mib")}
                             for c in rounds[0]}}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["median"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
