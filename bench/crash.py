"""Longer crash-safety and corruption runs than CI's: the same tests, more trials.

    flock /tmp/dv-bench.lock .venv/bin/python bench/crash.py [--trials 1000] [--corruptions 600] [--seed N]

Prints (and writes to bench/results/crash.json) the figures docs/reliability.md quotes:
trials, kills, faults injected, corruptions detected, data lost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(test: str, env_extra: dict[str, str], report_var: str) -> dict[str, object]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        report = f.name
    env = dict(os.environ, **env_extra, **{report_var: report})
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", test],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    out: dict[str, object] = {"passed": p.returncode == 0, "seconds": round(time.monotonic() - t0, 1)}
    try:
        out.update(json.loads(Path(report).read_text()))
    except (OSError, ValueError):
        out["output"] = p.stdout[-3000:] + p.stderr[-2000:]
    os.unlink(report)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--corruptions", type=int, default=600)
    ap.add_argument("--seed", type=int)
    a = ap.parse_args()
    seed = {} if a.seed is None else {"DELTAVAULT_CRASH_SEED": str(a.seed), "DELTAVAULT_CORRUPTION_SEED": str(a.seed)}
    results = {
        "crash": run("tests/integration/test_crash.py", {"DELTAVAULT_CRASH_TRIALS": str(a.trials), **seed},
                     "DELTAVAULT_CRASH_REPORT"),
        "corruption": run("tests/integration/test_corruption.py::test_random_damage_is_found_named_and_repaired",
                          {"DELTAVAULT_CORRUPTION_TRIALS": str(a.corruptions), **seed},
                          "DELTAVAULT_CORRUPTION_REPORT"),
    }
    text = json.dumps(results, indent=2)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "crash.json").write_text(text + "\n")
    if not all(r["passed"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
