#!/usr/bin/env python3
"""Scale, measured as curves: trees of 10k, 100k and 1M small files (docs/benchmarks.md,
issue #18), deltavault against restic and borg on the settings of bench/peers.py.

For each N a tree is generated untimed (bench/scale_tree.py: 100 B to 16 KiB, log-uniform,
200 files a directory). Then, round by round, each tool in turn (the order rotates each
round) runs four operations, each a fresh CLI process:

- **full**: a first backup into a new repository (and a new cache);
- **nochange**: a second backup of the same tree;
- **changed1pct**: after 1% of the files are rewritten, 0.05% removed and 0.05% added
  (the same files for every tool), a third backup;
- **restore**: the latest snapshot restored to a new ext4 on a loop device (as bench/sftp.py
  does: a file system that has just deleted a million files slows whoever writes next), its
  file count checked.

Every tool runs one operation before any runs the next, so the tree is changed once per
round, and it is put back (untimed) before the next round. The tree's files are older than
2 s when a backup starts (deltavault re-reads files changed within 2 s of its previous run).
For each run: wall time, CPU time (user + sys of the process and its children) and the peak
RSS of the whole process tree (bench/memory.py's sampler, every 20 ms). It prints a table,
merges the figures into ``--out`` (JSON, by N) and draws ``--plot`` from everything there.

    flock /tmp/dv-bench.lock .venv/bin/python bench/scale_files.py --files 10000 100000 --rounds 3
    flock /tmp/dv-bench.lock .venv/bin/python bench/scale_files.py --files 1000000 --rounds 1
    .venv/bin/python bench/scale_files.py --plot-only

Needs root (loop devices), restic and borg. Generating the 1M tree takes about a minute and
3.2 GB (about 5 GB on disk), each restore as much again on its loop device; all is removed
at the end (``--keep`` keeps the trees for another run).
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench.memory import Run, measured  # noqa: E402
from peers import BORG_CREATE, BORG_INIT, DESCRIPTION, RESTIC_BACKUP, RESTIC_INIT  # noqa: E402
from restore_fs import restore_fs  # noqa: E402
from scale_tree import change, generate, put_back, rel  # noqa: E402

TOOLS = ("deltavault", "restic", "borg")
OPS = ("full", "nochange", "changed1pct", "restore")
PASSWORD = "bench"
RACY_S = 2.1  # deltavault's racy window is 2 s


@dataclass
class Tool:
    name: str
    backup: Callable[[int], list[str]]  # argv of the k-th backup (0, 1, 2)
    restore: Callable[[Path], tuple[list[str], Path | None]]  # (argv, cwd) restoring into a directory
    init: list[str]


def tools(work: Path, tree: Path) -> tuple[dict[str, Tool], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAVAULT_", "RESTIC_", "BORG_"))}
    env.update(DELTAVAULT_PASSWORD=PASSWORD, DELTAVAULT_CACHE_DIR=str(work / "dv-cache"),
               PYTHONPATH=str(ROOT / "src"), RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=str(work / "restic-cache"),
               BORG_PASSPHRASE=PASSWORD, BORG_BASE_DIR=str(work / "borg-base"))
    dv = [sys.executable, "-m", "deltavault", "-r", str(work / "dv-repo")]
    restic = ["restic", "-r", str(work / "restic-repo")]
    borg_repo = str(work / "borg-repo")
    return {
        "deltavault": Tool("deltavault", lambda k: [*dv, "--json", "backup", str(tree)],
                           lambda d: ([*dv, "restore", "latest", "--target", str(d / "out")], None),
                           [*dv, "init"]),
        "restic": Tool("restic", lambda k: [*restic, "backup", "-q", *RESTIC_BACKUP, str(tree)],
                       lambda d: ([*restic, "restore", "latest", "-q", "--target", str(d / "out")], None),
                       [*restic, "init", *RESTIC_INIT]),
        "borg": Tool("borg", lambda k: ["borg", "create", *BORG_CREATE, f"{borg_repo}::a{k}", str(tree)],
                     lambda d: (["borg", "extract", f"{borg_repo}::a2"], d / "out"),
                     ["borg", "init", *BORG_INIT, borg_repo]),
    }, env


def count_files(top: Path) -> int:
    return sum(len(files) for _d, _s, files in os.walk(top))


def restore_into_fresh_fs(tool: Tool, env: dict[str, str], work: Path, n: int) -> Run:
    # 12 KiB a file holds the data (3.2 KiB a file on average, in 4 KiB blocks) and an
    # inode every 8 KiB is room for all files; the image is sparse.
    size = f"{(n * 12 + (1 << 20)) // 1024}M"
    with restore_fs(work, size, "-i", "8192") as mnt:
        argv, cwd = tool.restore(mnt)
        if cwd is not None:
            cwd.mkdir()
        r = measured_in(argv, env, cwd)
        got = count_files(mnt / "out")
        if got != n:
            raise SystemExit(f"{tool.name} restored {got} files, not {n}")
        return r


def measured_in(argv: list[str], env: dict[str, str], cwd: Path | None) -> Run:
    if cwd is None:
        return measured(argv, env, interval=0.02)
    old = os.getcwd()
    os.chdir(cwd)  # borg extracts into its working directory
    try:
        return measured(argv, env, interval=0.02)
    finally:
        os.chdir(old)


def one_round(n: int, tree: Path, work: Path, order: list[str], results: dict[str, dict[str, list[Run]]]) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ts, env = tools(work, tree)
    for name in order:
        subprocess.run(ts[name].init, env=env, check=True, capture_output=True)
    time.sleep(RACY_S)
    for k, op in enumerate(("full", "nochange", "changed1pct")):
        if op == "changed1pct":
            stats = change(tree, n)
            print(f"  changed: {stats}", file=sys.stderr, flush=True)
            time.sleep(RACY_S)
        for name in order:
            subprocess.run(["sync"], check=True)
            r = measured(ts[name].backup(k), env, interval=0.02)
            results[name].setdefault(op, []).append(r)
            report(n, name, op, r)
    expected = n  # as many added as removed
    for name in order:
        r = restore_into_fresh_fs(ts[name], env, work, expected)
        results[name].setdefault("restore", []).append(r)
        report(n, name, "restore", r)
    shutil.rmtree(work)


def report(n: int, name: str, op: str, r: Run) -> None:
    print(f"  {n:>8} {name:<10} {op:<12} {r.seconds:8.2f} s {r.cpu:8.2f} CPU-s {r.tree_rss_mib:7.0f} MiB",
          file=sys.stderr, flush=True)


def summary(runs: list[Run], n: int) -> dict[str, object]:
    sec = statistics.median(r.seconds for r in runs)
    return {"seconds": round(sec, 2), "us_per_file": round(sec / n * 1e6, 1),
            "cpu_s": round(statistics.median(r.cpu for r in runs), 2),
            "rss_mib": round(statistics.median(r.tree_rss_mib for r in runs)),
            "rss_max_mib": round(max(r.tree_rss_mib for r in runs)),
            "runs_s": [round(r.seconds, 2) for r in runs], "runs_rss_mib": [round(r.tree_rss_mib) for r in runs]}


def print_table(data: dict[str, dict]) -> None:
    print(f"{'files':>9} {'op':<12}" + "".join(f"{t:>24}" for t in TOOLS))
    print(f"{'':>9} {'':<12}" + "".join(f"{'s (us/file) MiB':>24}" for _ in TOOLS))
    for key in sorted(data, key=int):
        for op in OPS:
            cells = []
            for t in TOOLS:
                s = data[key]["tools"].get(t, {}).get(op)
                cells.append(f"{s['seconds']:.2f} ({s['us_per_file']:.0f}) {s['rss_mib']}" if s else "-")
            print(f"{int(key):>9} {op:<12}" + "".join(f"{c:>24}" for c in cells))


GOALS = {"nochange": (8.0, 200 * 1e6 / 2**20, "goal at 1M")}  # issue #18: 8 s and 200 MB at 1M files
TITLE = "Small files: deltavault, restic 0.14, borg 1.2 (shared 2-core VM; bench/scale_files.py)"


def plot(data: dict[str, dict], out: Path, *, ops: tuple[str, ...] = OPS, tools: tuple[str, ...] = TOOLS,
         xlabel: str = "files", title: str = TITLE,
         goals: dict[str, tuple[float, float | None, str]] | None = None) -> None:
    """Log-log curves, one column per op: wall time above, peak RSS below, one line per tool
    found in ``data[n]["tools"]``. ``goals``: per op, (seconds, MiB or None, label) drawn as lines
    (bench/scale_blobs.py draws its curves with this too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    goals = GOALS if goals is None else goals
    fig, axes = plt.subplots(2, len(ops), figsize=(4 * len(ops), 7), squeeze=False)
    ns = sorted(int(k) for k in data)
    for j, op in enumerate(ops):
        for i, (t, style) in enumerate(zip(tools, ("o-", "s--", "^:", "D-."), strict=False)):
            pts = [(n, data[str(n)]["tools"][t][op]) for n in ns if op in data[str(n)]["tools"].get(t, {})]
            if not pts:
                continue
            for row, key in enumerate(("seconds", "rss_mib")):  # one colour a tool in every panel
                axes[row][j].plot([p[0] for p in pts], [p[1][key] for p in pts], style, color=f"C{i}", label=t)
        axes[0][j].set_title(op)
        if op in goals:
            secs, mib, label = goals[op]
            axes[0][j].axhline(secs, color="grey", lw=0.8, ls="--", label=f"{label}: {secs:g} s")
            axes[0][j].legend(fontsize="small")
            if mib is not None:
                axes[1][j].axhline(mib, color="grey", lw=0.8, ls="--", label=f"{label}: {mib * 2**20 / 1e6:g} MB")
                axes[1][j].legend(fontsize="small")
        for i, what in enumerate(("wall time, s", "peak RSS of the process tree, MiB")):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # labels within a decade too
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel(what)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dv-scale-files-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale_files.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "scale-files.png")
    ap.add_argument("--plot-only", action="store_true", help="draw --plot from --out, run nothing")
    ap.add_argument("--no-plot", action="store_true", help="draw nothing (make bench-quick)")
    ap.add_argument("--keep", action="store_true", help="keep the generated trees")
    a = ap.parse_args()
    data: dict[str, dict] = json.loads(a.out.read_text()) if a.out.exists() else {}
    if not a.plot_only:
        for n in a.files:
            tree = a.work / f"tree-{n}"
            if not (tree / rel(n - 1)).exists():
                shutil.rmtree(tree, ignore_errors=True)
                t0 = time.monotonic()
                size = generate(tree, n)
                print(f"generated {n} files, {size / 1e9:.2f} GB, in {time.monotonic() - t0:.0f} s",
                      file=sys.stderr, flush=True)
            load0 = os.getloadavg()
            results: dict[str, dict[str, list[Run]]] = {t: {} for t in a.tools}
            started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            for rnd in range(a.rounds):
                order = a.tools[rnd % len(a.tools):] + a.tools[:rnd % len(a.tools)]
                print(f"{n} files, round {rnd + 1}/{a.rounds}: {' '.join(order)}", file=sys.stderr, flush=True)
                if rnd:
                    put_back(tree, n)
                one_round(n, tree, a.work / "run", order, results)
            data[str(n)] = {"when": started, "ended": time.strftime("%H:%M UTC", time.gmtime()),
                            "rounds": a.rounds, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                            "cpus": os.cpu_count(), "peers": DESCRIPTION,
                            "tools": {t: {op: summary(rs, n) for op, rs in ops.items()} for t, ops in results.items()}}
            if not a.keep:
                shutil.rmtree(tree)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(data, indent=1) + "\n")
    print_table(data)
    if data and not a.no_plot:
        plot(data, a.plot)
    if not a.keep and not a.plot_only:
        shutil.rmtree(a.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
