#!/usr/bin/env python3
"""Snapshot commands on a repository of 10,000 snapshots (docs/benchmarks.md, issue #18).

The repository is built through the real code paths, quickly: a tiny tree is backed up
twice by the file engine (``run_backup``: two real trees, so ``diff`` has changes to show),
then ``Repository.save_snapshot`` stores N snapshots, each the engine's snapshot of one of
the two trees with its own time (one every 97 minutes back from now, so the daily, weekly,
monthly and yearly rules all have buckets to fill). Nothing writes repository files by hand.

Then each command runs as a child CLI process (interpreter start, key derivation, opening
the repository included), ``--repeat`` times, with a warm local cache (one untimed run
first fills it): ``snapshots``, ``forget --keep-last 5 --dry-run``, ``forget --keep-daily 7
--keep-weekly 5 --keep-monthly 12 --keep-yearly 3 --dry-run``, ``diff A B`` (two snapshots by
id prefix) and ``report --json``. Each run is measured by bench/memory.py's sampler (every
20 ms): wall time, CPU time and the peak RSS of the process tree.

A curve: ``--snapshots 100 1000 10000`` builds one repository for each count (under
``--work``/dv-N). ``--peers restic borg`` runs the same commands in the peers' words
(``snapshots``/``list``, ``forget --dry-run``/``prune --dry-run --list`` with the same
policies, ``diff``) on repositories their own CLIs build, one backup at a time
(bench/snapshot_peers.py), up to ``--peer-max`` snapshots or as far as ``--peer-budget``
seconds of building allow. Within a count, round by round, every tool runs a command before
any runs the next, the order of the tools rotating. It prints a table (median wall time and
peak RSS) and merges everything into ``--out`` under ``--label``; ``--plot`` draws the
curves (time and RSS against the number of snapshots).

    flock /tmp/dv-bench.lock .venv/bin/python bench/scale_snapshots.py [--snapshots 10000]
        [--repeat 5] [--work DIR] [--out bench/results/scale_snapshots.json] [--label NAME]
        [--src OTHER_CHECKOUT/src]    # the same repository, timed with another revision
        [--peers restic borg] [--peer-max 1000] [--peer-budget 900] [--peer-work DIR]
        [--plot docs/scale-snapshots.png] [--clean]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import snapshot_peers  # noqa: E402
from bench.memory import Run, measured  # noqa: E402
from peers import DESCRIPTION  # noqa: E402
from scale_files import plot  # noqa: E402

from deltavault.backends.local import LocalBackend  # noqa: E402
from deltavault.backup.files.options import FileBackupOptions  # noqa: E402
from deltavault.backup.files.run import BackupRequest, run_backup  # noqa: E402
from deltavault.repository.repository import Repository  # noqa: E402

PASSWORD = b"bench"
SCRYPT = (2**10, 8, 1)
STEP_NS = 97 * 60 * 10**9
TOOLS = ("deltavault", "restic", "borg")
PLOTTED = ("snapshots", "forget --keep-daily.. --dry-run", "diff A B")
TITLE = "Snapshots: deltavault, restic 0.14, borg 1.2 (shared 2-core VM; bench/scale_snapshots.py)"


def opened(repo_dir: Path, cache: Path) -> Repository:
    return Repository.open(LocalBackend(repo_dir, fsync=False), lambda: PASSWORD, cache_root=cache)


def build(work: Path, snapshots: int) -> tuple[Path, Path, str, str]:
    """The repository, its cache, and the ids of two snapshots of different trees."""
    repo_dir, cache, stamp = work / "repo", work / "cache", work / f"built-{snapshots}.json"
    if stamp.exists():
        a, b = json.loads(stamp.read_text())
        return repo_dir, cache, a, b
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    Repository.init(LocalBackend(repo_dir, fsync=False), PASSWORD, scrypt=SCRYPT, cache_root=cache)
    src = work / "src"
    for i in range(20):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    repo = opened(repo_dir, cache)
    t0 = time.monotonic()
    opts = FileBackupOptions(racy_window_ns=0)
    first = run_backup(repo, BackupRequest(paths=[str(src)], options=opts))
    (src / "d0" / "f0.txt").write_text("changed\n")
    (src / "d1" / "new.txt").write_text("added\n")
    (src / "d2" / "f2.txt").unlink()
    second = run_backup(repo, BackupRequest(paths=[str(src)], options=opts))
    models = [repo.load_snapshot(first.snapshot_id), repo.load_snapshot(second.snapshot_id)]
    for sid in (first.snapshot_id, second.snapshot_id):
        repo.delete_snapshot(sid)  # their times are now; the N below carry the times
    now = time.time_ns()
    ids: list[str] = []
    for i in range(snapshots):
        t_ns = now - (snapshots - i) * STEP_NS
        when = datetime.fromtimestamp(t_ns / 1e9, UTC).isoformat().replace("+00:00", "Z")
        model = models[i % 2]
        ids.append(repo.save_snapshot(msgspec.structs.replace(model, time_ns=t_ns, time=when)))
        if i % 2000 == 1999:
            print(f"  {i + 1} snapshots, {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    a, b = ids[-2], ids[-1]  # the newest two: different trees
    stamp.write_text(json.dumps([a, b]))
    print(f"built {snapshots} snapshots in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return repo_dir, cache, a, b


def commands(a: str, b: str) -> dict[str, list[str]]:
    return {
        "snapshots": ["snapshots"],
        "forget --keep-last 5 --dry-run": ["forget", "--keep-last", "5", "--dry-run"],
        "forget --keep-daily.. --dry-run": ["forget", "--keep-daily", "7", "--keep-weekly", "5",
                                            "--keep-monthly", "12", "--keep-yearly", "3", "--dry-run"],
        "diff A B": ["diff", a[:8], b[:8]],
        "report --json": ["--json", "report"],
    }


def dv_env(repo_dir: Path, cache: Path, src: Path) -> dict[str, str]:
    # Bytecode as an installation has it, in a cache of each source tree's own (the untimed
    # first run writes it), whatever the environment says: else a tree that happens to hold
    # __pycache__ starts 0.2 s faster than one that does not.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DELTAVAULT_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(DELTAVAULT_REPOSITORY=str(repo_dir), DELTAVAULT_PASSWORD=PASSWORD.decode(),
               DELTAVAULT_CACHE_DIR=str(cache), PYTHONPATH=str(src),
               PYTHONPYCACHEPREFIX=str(repo_dir.parent / "pycache" / str(src).strip("/").replace("/", "_")))
    return env


def run_once(argv: list[str], env: dict[str, str]) -> Run:
    return measured(argv, env, interval=0.02)


def measure_point(n: int, a: argparse.Namespace, peer_ok: dict[str, str]) -> dict[str, dict[str, list[Run]]]:
    """Every tool's commands on ``n`` snapshots: one untimed run of each (it warms the
    caches), then ``--repeat`` rounds, in each every command by every tool, the order of
    the tools rotating from round to round."""
    work = a.work if len(a.snapshots) == 1 else a.work / f"dv-{n}"
    repo_dir, cache, sa, sb = build(work, n)
    env = dv_env(repo_dir, cache, a.src.resolve())
    cmds = {"deltavault": ({k: [sys.executable, "-m", "deltavault", *v] for k, v in commands(sa, sb).items()}, env)}
    for peer in a.peers:
        if n > a.peer_max or snapshot_peers.count(peer, a.peer_work) > n:
            continue
        state = snapshot_peers.build(peer, a.peer_work, n, min(max(a.snapshots), a.peer_max), a.peer_budget)
        if state is None:
            peer_ok.setdefault(peer, f"stopped below {n}: the build would take over --peer-budget")
            continue
        cmds[peer] = (snapshot_peers.commands(peer, a.peer_work, state["ids"]),
                      snapshot_peers.peer_env(a.peer_work))
    names = [name for name in commands(sa, sb) if not a.only or any(name.startswith(o) for o in a.only)]
    runs: dict[str, dict[str, list[Run]]] = {t: {} for t in cmds}
    for argvs, e in cmds.values():
        for name in names:
            if name in argvs:
                run_once(argvs[name], e)
    tools = list(cmds)
    for rnd in range(a.repeat):
        order = tools[rnd % len(tools):] + tools[:rnd % len(tools)]
        for name in names:
            for t in order:
                argvs, e = cmds[t]
                if name in argvs:
                    r = run_once(argvs[name], e)
                    runs[t].setdefault(name, []).append(r)
                    print(f"  {n:>6} {t:<10} {name:<34} {r.seconds:6.2f} s {r.tree_rss_mib:5.0f} MiB",
                          file=sys.stderr, flush=True)
    return runs


def summary(rs: list[Run]) -> dict[str, object]:
    t = [r.seconds for r in rs]
    return {"median_s": round(statistics.median(t), 3), "all_s": [round(x, 3) for x in t],
            "seconds": round(statistics.median(t), 3), "cpu_s": round(statistics.median(r.cpu for r in rs), 3),
            "rss_mib": round(statistics.median(r.tree_rss_mib for r in rs), 1)}


def print_table(curve: dict[str, dict]) -> None:
    tools = [t for t in TOOLS if any(t in p["tools"] for p in curve.values())]
    print(f"{'snapshots':>9} {'command':<34}" + "".join(f"{t + ' s (MiB)':>20}" for t in tools))
    for n in sorted(curve, key=int):
        for name in commands("a" * 8, "b" * 8):
            cells = []
            for t in tools:
                s = curve[n]["tools"].get(t, {}).get(name)
                cells.append(f"{s['seconds']:.2f} ({s['rss_mib']:.0f})" if s else "-")
            if any(c != "-" for c in cells):
                print(f"{int(n):>9} {name:<34}" + "".join(f"{c:>20}" for c in cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshots", type=int, nargs="+", default=[10_000])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dv-scale-snapshots"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale_snapshots.json")
    ap.add_argument("--label", default="run", help="the key these figures go under in --out")
    ap.add_argument("--src", type=Path, default=ROOT / "src",
                    help="the deltavault source tree the timed commands run (default: this one; "
                    "an older checkout's src gives the 'before' figures on the same repository)")
    ap.add_argument("--only", action="append", default=[], help="only commands starting with this")
    ap.add_argument("--peers", nargs="*", default=[], choices=snapshot_peers.PEERS,
                    help="restic and/or borg too, on repositories their own CLIs build (bench/snapshot_peers.py)")
    ap.add_argument("--peer-max", type=int, default=1000, help="the largest count the peers are built to")
    ap.add_argument("--peer-budget", type=float, default=900,
                    help="seconds a peer's build may take to reach the next count, at its rate so far")
    ap.add_argument("--peer-work", type=Path, default=Path("/tmp/dv-scale-snapshots-peers"),
                    help="the peers' repositories (kept with --keep, grown by the next run)")
    ap.add_argument("--plot", type=Path, help="draw the curves of this run here (PNG)")
    ap.add_argument("--clean", action="store_true", help="remove --work and --peer-work at the end")
    a = ap.parse_args()
    load0 = os.getloadavg()
    started = datetime.now(UTC).isoformat(timespec="minutes")
    curve: dict[str, dict] = {}
    peer_stop: dict[str, str] = {}
    for n in a.snapshots:
        runs = measure_point(n, a, peer_stop)
        curve[str(n)] = {"when": started, "loadavg_end": os.getloadavg(),
                         "tools": {t: {name: summary(rs) for name, rs in ops.items()} for t, ops in runs.items()}}
    old = json.loads(a.out.read_text()) if a.out.exists() else {}
    if len(a.snapshots) > 1 or a.peers:  # a curve: the points of earlier runs under this label stay
        curve = {**old.get(a.label, {}).get("curve", {}), **curve}
    print_table(curve)
    entry: dict[str, object] = {"when": started, "ended": datetime.now(UTC).isoformat(timespec="minutes"),
                                "snapshots": a.snapshots if len(a.snapshots) > 1 else a.snapshots[0],
                                "repeat": a.repeat, "src": str(a.src), "load": load0[0], "loadavg_start": load0,
                                "loadavg_end": os.getloadavg(), "peers": DESCRIPTION if a.peers else None,
                                "peer_stop": {**{p: why for p, why in old.get(a.label, {}).get("peer_stop", {}).items()
                                                 if p not in a.peers}, **peer_stop}}
    if len(a.snapshots) == 1:
        entry["commands"] = curve[str(a.snapshots[0])]["tools"]["deltavault"]
    entry["curve"] = curve
    old[a.label] = entry
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(old, indent=1) + "\n")
    if a.plot:
        plot(curve, a.plot, ops=PLOTTED, tools=TOOLS, xlabel="snapshots in the repository", title=TITLE,
             goals={op: (2.0, None, "goal at 10,000") for op in PLOTTED})
    if a.clean:
        shutil.rmtree(a.work, ignore_errors=True)
        shutil.rmtree(a.peer_work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
