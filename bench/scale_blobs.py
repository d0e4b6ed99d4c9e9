#!/usr/bin/env python3
"""Scale, measured as curves: repositories of 100k, 1M and 10M blobs in the index
(docs/benchmarks.md, "Scale: blobs in the index"; issue #18).

For each N, bench/prune_memory.py's builder makes the repository through the real
Repository API (tiny data blobs, trees of 1,000 files, ten snapshots, the first five
forgotten), timed, untimed by the lock. Each round then works on a fresh copy of it and runs,
each a fresh CLI process measured by bench/memory.py's sampler (wall time, VmHWM):

- **backup**: a backup of a tiny tree (three files) into that repository: the start-up cost
  of a backup. The child runs the CLI under a trace (``TRACE`` below: it wraps
  ``Repository.open`` to time it and changes nothing else) that tells when the repository
  is open, counted from just before the process was started;
- **snapshots**: open the repository, load the index, list;
- **prune**: after the forget (the five snapshots), with the exclusive lock time it reports;
- **check**: afterwards.

``--peers`` builds the equivalent for restic and borg where it can be built in reasonable
time: N distinct 16-byte files in ten directories, one snapshot per directory, then the same
four operations (``restic backup``/``borg create`` of the tiny tree, ``snapshots``/``list``,
forget the first five and ``restic prune``/``borg compact``, ``check``). There is no other
way to get N blobs into their repositories: they cannot read a synthetic deltavault one.

    .venv/bin/python bench/scale_blobs.py --build-only --blobs 100000 1000000 --keep    # untimed
    flock /tmp/dv-bench.lock .venv/bin/python bench/scale_blobs.py --blobs 100000 1000000 --keep
    .venv/bin/python bench/scale_blobs.py --plot-only

``--src DIR...`` runs the CLI from other source trees, each round in turn (``--label`` names
their rows: before and after a change, interleaved in one locked run); ``--ops``
picks deltavault's operations; ``--warm`` runs one unmeasured ``snapshots`` first (a cache
that the first open writes, such as a local copy of the built index, is then in use).
Scratch: about 2 GB for the 10M repository (and as much for each round's copy), 4.4 GB for
the peers' 1M files and repositories.
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench.memory import Run, measured  # noqa: E402
from bench.peers import BORG_CREATE, BORG_INIT, DESCRIPTION, RESTIC_BACKUP, RESTIC_INIT  # noqa: E402
from bench.prune_memory import PASSWORD, SNAPSHOTS, build  # noqa: E402
from bench.quiesce import compiled  # noqa: E402

OPS = ("backup", "snapshots", "prune", "check")
TOOLS = ("deltavault", "restic", "borg")
PEER_DIR_FILES = 1000

# Run in the child: time Repository.open (from the parent's DV_T0) and the first build of
# the in-memory index (its duration, and when it ended), and report them on stderr.
TRACE = """
import atexit, json, os, runpy, sys, time
from deltavault.repository.repository import Repository
t0 = float(os.environ["DV_T0"]); marks = {}
orig = Repository.open.__func__
def traced(cls, *a, **k):
    marks.setdefault("open_start_s", time.time() - t0)
    repo = orig(cls, *a, **k)
    marks.setdefault("open_done_s", time.time() - t0)
    return repo
Repository.open = classmethod(traced)
from deltavault.repository.indexstore import IndexStore
orig_build = IndexStore._build
def traced_build(self, how):  # the in-memory index built (at its first use): from the files or the copy
    t = time.time()
    try:
        return orig_build(self, how)
    finally:
        marks.setdefault("index_build_s", time.time() - t)
        marks.setdefault("index_done_s", time.time() - t0)
IndexStore._build = traced_build
atexit.register(lambda: print("TRACE " + json.dumps(marks), file=sys.stderr))
sys.argv = ["deltavault", *sys.argv[1:]]
runpy.run_module("deltavault", run_name="__main__", alter_sys=True)
"""


def last_json(out: bytes, kind: str) -> dict[str, object]:
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{") and json.loads(line).get("type") == kind:
            return dict(json.loads(line))
    return {}


def trace(err: bytes) -> dict[str, float]:
    for line in reversed(err.decode(errors="replace").splitlines()):
        if line.startswith("TRACE "):
            return {k: round(v, 3) for k, v in json.loads(line[6:]).items()}
    return {}


def tiny_tree(work: Path) -> Path:
    tree = work / "tiny"
    if not tree.exists():
        tree.mkdir(parents=True)
        for i in range(3):
            (tree / f"f{i}").write_bytes(b"tiny %d\n" % i)
    return tree


def run(argv: list[str], env: dict[str, str],
        extra: Callable[[bytes], dict[str, object]] | None = None) -> dict[str, object]:
    """One measured CLI run: wall, VmHWM, CPU, the trace's marks and ``extra(stdout)``."""
    out: list[bytes] = []
    env = dict(env, DV_T0=repr(time.time()))
    r: Run = measured(argv, env, interval=0.02, output=out)
    res: dict[str, object] = {"seconds": round(r.seconds, 2), "rss_mib": round(r.hwm_sum_mib, 1),
                              "cpu_s": round(r.cpu, 2), **trace(out[1])}
    if extra is not None:
        res.update(extra(out[0]))
    return res


def deltavault_round(built: Path, work: Path, src: Path, ops: list[str],
                     warm: bool) -> dict[str, dict[str, object]]:
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["cp", "-a", str(built), str(work)], check=True)  # prune changes the repository
    subprocess.run(["sync"], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env.update(DELTAVAULT_REPOSITORY=str(work / "repo"), DELTAVAULT_PASSWORD=PASSWORD.decode(),
               DELTAVAULT_CACHE_DIR=str(work / "cache"), PYTHONPATH=str(src))
    dv = [sys.executable, "-c", TRACE, "--json"]
    if warm:  # an unmeasured open first: what it leaves in the cache (a built index) is used
        subprocess.run([*dv, "snapshots"], env=dict(env, DV_T0="0"), check=True, capture_output=True)
    res: dict[str, dict[str, object]] = {}
    if "backup" in ops:
        res["backup"] = run([*dv, "backup", str(tiny_tree(work.parent))], env,
                            lambda o: {"inner_s": last_json(o, "summary").get("seconds")})
    if "snapshots" in ops:
        res["snapshots"] = run([*dv, "snapshots"], env)

    def prune_fields(o: bytes) -> dict[str, object]:
        s = last_json(o, "prune_summary")
        return {"exclusive_s": round(float(s.get("exclusive_seconds", 0.0)), 2),  # type: ignore[arg-type]
                "plan_s": round(float(s.get("plan_seconds", 0.0)), 2),  # type: ignore[arg-type]
                **{k: s.get(k) for k in ("blobs", "blobs_used", "packs_delete", "packs_repack", "blobs_repacked")}}
    if "prune" in ops:
        res["prune"] = run([*dv, "prune"], env, prune_fields)
    if "check" in ops:
        res["check"] = run([*dv, "check"], env)
    shutil.rmtree(work)
    return res


def peer_build(base: Path, n: int) -> dict[str, float]:
    """N distinct 16-byte files in ten directories, one snapshot of each in restic and borg."""
    files = base / "files"
    info: dict[str, float] = {}  # what this call built, timed
    if not (files / f"s{SNAPSHOTS - 1}").exists():
        t0 = time.monotonic()
        for i in range(n):
            d = files / f"s{i * SNAPSHOTS // n}" / f"d{i // PEER_DIR_FILES:05d}"
            if i % PEER_DIR_FILES == 0:
                d.mkdir(parents=True)
            (d / f"f{i % PEER_DIR_FILES:03d}").write_bytes(i.to_bytes(8, "little") + os.urandom(8))
        info["files_seconds"] = round(time.monotonic() - t0, 1)
    for tool in ("restic", "borg"):
        if (base / f"{tool}-built").exists():
            continue
        t0 = time.monotonic()
        work = base / f"{tool}-build"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        env, argv = peer(tool, work)
        subprocess.run(argv["init"], env=env, check=True, capture_output=True)
        for s in range(SNAPSHOTS):
            subprocess.run(argv["backup"] + [f"s{s}"] if tool == "restic" else argv["backup"] + [f"{work}/repo::a{s}", f"s{s}"],
                           env=env, check=True, cwd=files, capture_output=True)
        work.rename(base / f"{tool}-built")
        info[f"{tool}_build_seconds"] = round(time.monotonic() - t0, 1)
    return info


def peer(tool: str, work: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The environment (repository and cache in ``work``) and argv prefixes of restic or borg."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESTIC_", "BORG_"))}
    env.update(RESTIC_PASSWORD=PASSWORD.decode(), RESTIC_CACHE_DIR=str(work / "cache"),
               BORG_PASSPHRASE=PASSWORD.decode(), BORG_BASE_DIR=str(work / "cache"),
               BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")  # each round runs on a copy
    repo = str(work / "repo")
    if tool == "restic":
        r = ["restic", "-r", repo]
        return env, {"init": [*r, "init", *RESTIC_INIT], "backup": [*r, "backup", "-q", *RESTIC_BACKUP],
                     "snapshots": [*r, "snapshots"], "prune": [*r, "prune"], "check": [*r, "check"]}
    return env, {"init": ["borg", "init", *BORG_INIT, repo], "backup": ["borg", "create", *BORG_CREATE],
                 "snapshots": ["borg", "list", repo], "prune": ["borg", "compact", repo], "check": ["borg", "check", repo]}


def peer_round(base: Path, tool: str, tiny: Path) -> dict[str, dict[str, object]]:
    work = base / f"{tool}-run"
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["cp", "-a", str(base / f"{tool}-built"), str(work)], check=True)  # repository and cache
    subprocess.run(["sync"], check=True)
    env, argv = peer(tool, work)
    if tool == "restic":
        ids = json.loads(subprocess.run([*argv["snapshots"], "--json"], env=env, check=True,
                                        capture_output=True).stdout)
        old = [s["id"] for s in sorted(ids, key=lambda s: s["time"])[:SNAPSHOTS // 2]]
        res = {"backup": run([*argv["backup"], str(tiny)], env), "snapshots": run(argv["snapshots"], env)}
        subprocess.run(["restic", "-r", str(work / "repo"), "forget", *old], env=env, check=True, capture_output=True)
    else:
        res = {"backup": run([*argv["backup"], f"{work}/repo::tiny", str(tiny)], env),
               "snapshots": run(argv["snapshots"], env)}
        for s in range(SNAPSHOTS // 2):
            subprocess.run(["borg", "delete", f"{work}/repo::a{s}"], env=env, check=True, capture_output=True)
    res["prune"] = run(argv["prune"], env)
    res["check"] = run(argv["check"], env)
    shutil.rmtree(work)
    return res


def summary(runs: list[dict[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = round(statistics.median(float(r[k]) for r in runs), 3)  # type: ignore[arg-type]
        else:
            out[k] = v
    out["runs_s"] = [r["seconds"] for r in runs]
    return out


def tools_in(data: dict[str, dict]) -> tuple[str, ...]:
    """Every tool measured, deltavault first, other --label rows (another source tree) next."""
    return tuple(sorted({t for d in data.values() for t in d["tools"]},
                        key=lambda t: (TOOLS.index(t) if t in TOOLS else 1, t)))


def print_table(data: dict[str, dict]) -> None:
    cols = tools_in(data)
    print(f"{'blobs':>10} {'op':<10}" + "".join(f"{t:>24}" for t in cols))
    print(f"{'':>10} {'':<10}" + "".join(f"{'s / MiB':>24}" for _ in cols))
    for key in sorted(data, key=int):
        for op in OPS:
            cells = []
            for t in cols:
                s = data[key]["tools"].get(t, {}).get(op)
                cells.append(f"{s['seconds']:.2f} / {s['rss_mib']:.0f}" if s else "-")
            print(f"{int(key):>10} {op:<10}" + "".join(f"{c:>24}" for c in cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blobs", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--src", type=Path, nargs="+", default=[ROOT / "src"],
                    help="the deltavault source trees the CLI runs from (several: in turn, each round)")
    ap.add_argument("--label", nargs="+", default=["deltavault"], help="the name of each --src's rows")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS, help="deltavault's operations to run")
    ap.add_argument("--warm", action="store_true", help="run one unmeasured `snapshots` before each round")
    ap.add_argument("--peers", action="store_true", help="also restic and borg (built from N files)")
    ap.add_argument("--no-deltavault", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/blobcurve-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale_blobs.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "scale-blobs.png")
    ap.add_argument("--plot-only", action="store_true", help="draw --plot from --out, run nothing")
    ap.add_argument("--build-only", action="store_true", help="build the repositories (untimed by the lock)")
    ap.add_argument("--keep", action="store_true", help="keep the built repositories")
    a = ap.parse_args()
    if len(a.label) != len(a.src):
        ap.error("one --label for each --src")
    if not (a.plot_only or a.build_only or a.no_deltavault):
        for src in a.src:  # as an install does: no run compiles the package at its start
            compiled(sys.executable, dict(os.environ, PYTHONPATH=str(src)))
    data: dict[str, dict] = json.loads(a.out.read_text()) if a.out.exists() else {}
    for n in [] if a.plot_only else a.blobs:
        entry = data.setdefault(str(n), {"tools": {}})
        built = a.work / f"dv-{n}"
        if not a.no_deltavault and not (built / "repo" / "config").exists():
            shutil.rmtree(built, ignore_errors=True)
            built.mkdir(parents=True)
            entry["build"] = build(built, n)
            print(f"built {n}: {entry['build']}", file=sys.stderr, flush=True)
        if a.peers:
            entry.setdefault("peer_build", {}).update(peer_build(a.work / f"peers-{n}", n))
            print(f"peers built {n}: {entry['peer_build']}", file=sys.stderr, flush=True)
        if a.build_only:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(data, indent=1) + "\n")
            continue
        load0 = os.getloadavg()
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        runs: dict[str, list[dict[str, dict[str, object]]]] = {}
        for rnd in range(a.rounds):
            for src, label in [] if a.no_deltavault else zip(a.src, a.label):  # interleaved
                runs.setdefault(label, []).append(deltavault_round(built, a.work / "run", src, a.ops, a.warm))
            for tool in ("restic", "borg") if a.peers else ():
                runs.setdefault(tool, []).append(peer_round(a.work / f"peers-{n}", tool, tiny_tree(a.work)))
            for tool, rs in runs.items():
                print(f"  {n} round {rnd + 1} {tool}: {json.dumps(rs[-1])}", file=sys.stderr, flush=True)
        for tool, rs in runs.items():
            entry["tools"][tool] = {op: summary([r[op] for r in rs]) for op in OPS if op in rs[0]}
            entry["tools"][tool].update(when=started, warm=a.warm, rounds=a.rounds, loadavg_start=load0,
                                        loadavg_end=os.getloadavg(), cpus=os.cpu_count(),
                                        src=str(dict(zip(a.label, a.src)).get(tool, "")))
        if a.peers:
            entry["peers"] = DESCRIPTION
        if not a.keep:
            shutil.rmtree(built, ignore_errors=True)
            shutil.rmtree(a.work / f"peers-{n}", ignore_errors=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(data, indent=1) + "\n")
    print_table(data)
    if data and not a.build_only:
        from bench.scale_files import plot
        plot(data, a.plot, ops=OPS, tools=tools_in(data), xlabel="blobs in the index", goals={},
             title="Blobs in the index: deltavault, restic 0.14, borg 1.2 (shared 2-core VM; bench/scale_blobs.py)")
    if not a.keep and not a.plot_only:
        shutil.rmtree(a.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
