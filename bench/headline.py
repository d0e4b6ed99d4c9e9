#!/usr/bin/env python3
"""The headline table of issue #18 in one run (``make bench-quick``): deltavault against borg
1.2 and restic 0.14 on the settings of bench/peers.py.

Scenarios, as ../shared/bench/anchors.sh stages them (bench/files.py's ``stage``: rsync keeps
the inodes of unchanged files, the database is updated in place; the image is copied with
``cp --sparse=always`` to the same path): **files-full** (tree-v1 + db-v1), **image-full**
(disk-v1.img), then v2 is staged, **files-incr** (tree-v2 + db-v2), **image-incr**
(disk-v2.img), and **restore** of the files-full snapshot to a new ext4 on a loop device
(bench/restore_fs.py), its file count checked. Each tool has one repository a round for all
four backups, as anchors.sh has (deltavault backs images up with ``backup --volume``).

Rounds are interleaved: every tool runs a scenario before any runs the next, and the order
of the tools rotates each round. Each run is a fresh CLI process measured by bench/memory.py's
``measured`` (every 20 ms): wall time, user+sys CPU of the process and the children it
reaped, peak RSS of the process tree, bytes its tree read (``rchar`` of /proc/PID/io: the
source, the repository, the libraries, and pipes between the tree's processes;
``read_bytes``: what came from the disk, little with a warm page cache; deltavault's own
count of source bytes read is kept too), and bytes added (growth of the repository
directory, ``du -sb``, as anchors.sh measures it). Medians over the rounds; the ratios are deltavault's median over
each peer's, from the same run. Prints a markdown table; writes JSON to ``--out``.

Bytes read from the source and written to and read from the repository, for every tool alike
(bench/devio.py): the source and the repositories are each on a new ext4 on a loop device of
its own, and each run's count is its devices' sectors read and written, after ``sync``. The
timed rounds run with a warm page cache (as before), so their reads mostly do not reach a
device; ``--counted`` extra rounds (1 by default, after the timed ones, the order rotated
as well) remount both file systems before every run so that each read does: the table's byte
columns are the medians of those counted rounds, whose times are kept in the JSON but left
out of the medians and ratios. Repository writes are exact in every round.

    flock /tmp/dv-bench.lock .venv/bin/python bench/headline.py --datasets ../data/ds [--rounds 3]
        [--tools deltavault borg restic] [--scenarios files-full image-full files-incr image-incr restore]
        [--counted 1]

Needs root (loop devices), borg and restic. Scratch under ``--work``, about 12 GB a round.
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

from bench.files import du, stage  # noqa: E402
from bench.memory import Run, measured  # noqa: E402
from devio import Disks, disks  # noqa: E402
from peers import BORG_CREATE, BORG_INIT, DESCRIPTION, RESTIC_BACKUP, RESTIC_INIT  # noqa: E402
from quiesce import compiled, settle, warm  # noqa: E402
from restore_fs import restore_fs  # noqa: E402
from scale_files import count_files  # noqa: E402

TOOLS = ("deltavault", "borg", "restic")
SCENARIOS = ("files-full", "image-full", "files-incr", "image-incr", "restore")
PASSWORD = "bench"
RACY_S = 2.1  # deltavault re-reads files changed within 2 s of its start
INTERVAL = 0.02
SIZES = {"source": "8G", "repo": "24G"}  # sparse images: the staged v2 source is 3.3 GB, three repositories 6 GB


@dataclass
class Tool:
    name: str
    repo: Path
    init: list[str]
    backup: Callable[[str, list[str]], list[str]]  # (scenario, paths) -> argv
    restore: Callable[[str, Path], tuple[list[str], Path | None]]  # (snapshot, mount) -> (argv, cwd)
    snapshot: Callable[[bytes], str]  # files-full's snapshot, from its run's stdout


def _summary(stdout: bytes) -> dict[str, object]:
    """deltavault's ``--json`` summary of a backup ({} for the peers)."""
    lines = [json.loads(x) for x in stdout.decode().splitlines() if x.startswith("{")]
    return ([x for x in lines if x.get("type") == "summary"] or [{}])[-1]


def _dv_snapshot(stdout: bytes) -> str:
    return str(_summary(stdout)["snapshot"])


def _restic_snapshot(repo: list[str], env: dict[str, str]) -> Callable[[bytes], str]:
    def first(_stdout: bytes) -> str:  # files-full is the repository's only snapshot then
        out = subprocess.run([*repo, "snapshots", "--json"], env=env, check=True, capture_output=True).stdout
        return str(json.loads(out)[0]["id"])
    return first


def tools(repos: Path, env: dict[str, str]) -> dict[str, Tool]:
    dv = [sys.executable, "-m", "deltavault", "-r", str(repos / "dv-repo")]
    restic = ["restic", "-r", str(repos / "restic-repo")]
    borg = str(repos / "borg-repo")
    return {
        "deltavault": Tool(
            "deltavault", repos / "dv-repo", [*dv, "init"],
            lambda s, p: [*dv, "--json", "backup", *(["--volume"] if s.startswith("image") else []), *p],
            lambda snap, m: ([*dv, "restore", snap, "--target", str(m / "out")], None), _dv_snapshot),
        "borg": Tool(
            "borg", repos / "borg-repo", ["borg", "init", *BORG_INIT, borg],
            lambda s, p: ["borg", "create", *BORG_CREATE, f"{borg}::{s}", *p],
            lambda snap, m: (["borg", "extract", f"{borg}::{snap}"], m / "out"), lambda _out: "files-full"),
        "restic": Tool(
            "restic", repos / "restic-repo", [*restic, "init", *RESTIC_INIT],
            lambda s, p: [*restic, "backup", "-q", *RESTIC_BACKUP, *p],
            lambda snap, m: ([*restic, "restore", snap, "-q", "--target", str(m / "out")], None),
            _restic_snapshot(restic, env)),
    }


def base_env(work: Path) -> dict[str, str]:
    # Bytecode cached as an installation has it (this VM sets PYTHONDONTWRITEBYTECODE: every
    # deltavault run would compile its modules again, 0.2 s); the untimed init writes it.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DELTAVAULT_", "RESTIC_", "BORG_")) and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(DELTAVAULT_PASSWORD=PASSWORD, DELTAVAULT_CACHE_DIR=str(work / "dv-cache"),
               PYTHONPATH=str(ROOT / "src"), PYTHONPYCACHEPREFIX=str(work.parent / "pycache"),
               RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=str(work / "restic-cache"),
               BORG_PASSPHRASE=PASSWORD, BORG_BASE_DIR=str(work / "borg-base"))
    return env


def staged(ds: Path, src: Path, version: str) -> dict[str, list[str]]:
    stage(ds, src, version)
    subprocess.run(["cp", "--sparse=always", str(ds / f"disk-{version}.img"), str(src / "disk.img")], check=True)
    files = [str(src / "tree"), str(src / "db.sqlite")]
    return {f"files-{k}": files for k in ("full", "incr")} | {f"image-{k}": [str(src / "disk.img")]
                                                              for k in ("full", "incr")}


def row(r: Run, **extra: object) -> dict[str, object]:
    return {"seconds": round(r.seconds, 2), "cpu": round(r.cpu, 2), "rss_mib": round(r.tree_rss_mib),
            "rchar": r.rchar, "read_bytes": r.read_bytes, **extra}


def backup(tool: Tool, scen: str, paths: list[str], env: dict[str, str], dev: Disks,
           cold: bool) -> tuple[dict[str, object], bytes]:
    before = du(tool.repo)
    io = dev.start(cold=cold)  # syncs
    out: list[bytes] = []
    r = measured(tool.backup(scen, paths), env, INTERVAL, output=out)
    counts = dev.stop(io)
    # deltavault also counts the source bytes it read itself (rchar counts every read).
    own = {"source_bytes_read": v} if (v := _summary(out[0]).get("bytes_read")) is not None else {}
    return row(r, bytes_added=du(tool.repo) - before, cold=cold, **counts, **own), out[0]


def restore(tool: Tool, snap: str, env: dict[str, str], work: Path, expected: int, dev: Disks,
            cold: bool) -> dict[str, object]:
    with restore_fs(work, "3G") as mnt:
        if not cold:
            warm(tool.repo)  # every tool alike: repository in the page cache, write-back drained
        settle()
        io = dev.start(cold=cold)
        argv, cwd = tool.restore(snap, mnt)
        if cwd is not None:
            cwd.mkdir()
        old = os.getcwd()
        os.chdir(cwd or old)  # borg extracts into its working directory
        try:
            r = measured(argv, env, INTERVAL)
        finally:
            os.chdir(old)
        counts = dev.stop(io)
        got = count_files(mnt / "out")
    if got != expected:
        print(f"  {tool.name} restored {got} files, not {expected}", file=sys.stderr, flush=True)
    return row(r, files=got, files_expected=expected, cold=cold, **counts)


def one_round(ds: Path, work: Path, order: list[str], scenarios: list[str],
              runs: dict[str, dict[str, list[dict[str, object]]]], cold: bool = False) -> None:
    """One round; ``cold``: a counted round (every run starts with its file systems remounted)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        with disks(work / "fs", SIZES) as dev:
            _round(ds, work, order, scenarios, runs, dev, cold)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _round(ds: Path, work: Path, order: list[str], scenarios: list[str],
           runs: dict[str, dict[str, list[dict[str, object]]]], dev: Disks, cold: bool) -> None:
    env = base_env(work)
    ts = tools(dev.disks["repo"].mnt, env)
    src = dev.disks["source"].mnt / "src"
    paths = staged(ds, src, "v1")
    expected = count_files(src / "tree") + 1
    for name in order:
        subprocess.run(ts[name].init, env=env, check=True, capture_output=True)
    time.sleep(RACY_S)
    snaps: dict[str, str] = {}
    for scen in ("files-full", "image-full", "files-incr", "image-incr"):
        if scen == "files-incr":
            paths = staged(ds, src, "v2")
            time.sleep(RACY_S)
        for name in order:
            if scen not in scenarios and not (scen == "files-full" and "restore" in scenarios):
                continue
            res, out = backup(ts[name], scen, paths[scen], env, dev, cold)
            if scen == "files-full":
                snaps[name] = ts[name].snapshot(out)
            if scen in scenarios:
                runs[name].setdefault(scen, []).append(res)
                report(name, scen, res)
    for name in order if "restore" in scenarios else []:
        res = restore(ts[name], snaps[name], env, work, expected, dev, cold)
        runs[name].setdefault("restore", []).append(res)
        report(name, "restore", res)


def report(name: str, scen: str, r: dict[str, object]) -> None:
    added = f", added {r['bytes_added'] / 1e6:.0f} MB" if "bytes_added" in r else ""  # type: ignore[operator]
    dev = "".join(f", {k.replace('_', ' ')} {r[k] / 1e6:.0f} MB" for k in DEV_KEYS)  # type: ignore[operator]
    print(f"  {name:<10} {scen:<10} {r['seconds']:7.2f} s {r['cpu']:7.2f} CPU-s {r['rss_mib']:>5} MiB"
          f", rchar {r['rchar'] / 1e6:.0f} MB{added}{dev}{' (cold)' if r['cold'] else ''}",
          file=sys.stderr, flush=True)  # type: ignore[operator]


DEV_KEYS = ("source_read", "repo_written", "repo_read")  # bench/devio.py's counts, bytes
KEYS = ("seconds", "cpu", "rss_mib", "bytes_added", "rchar", "read_bytes", "source_bytes_read",
        *DEV_KEYS, "source_written")


def medians(runs: dict[str, dict[str, list[dict[str, object]]]]) -> dict[str, dict[str, dict[str, float]]]:
    return {t: {s: {k: statistics.median(float(r[k]) for r in rs) for k in KEYS if k in rs[0]}  # type: ignore[arg-type]
                for s, rs in by.items()} for t, by in runs.items()}


def ratios(med: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """deltavault's median over each peer's, per scenario and measure."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for peer in (t for t in med if t != "deltavault"):
        for scen, ours in med.get("deltavault", {}).items():
            theirs = med[peer].get(scen, {})
            out.setdefault(scen, {})[peer] = {k: round(ours[k] / theirs[k], 2) if theirs.get(k) else None
                                              for k in ("seconds", "cpu", "rss_mib", "bytes_added") if k in ours}
    return out


def markdown(med: dict[str, dict[str, dict[str, float]]], rat: dict[str, dict[str, dict[str, float | None]]],
             scenarios: list[str], cnt: dict[str, dict[str, dict[str, float]]],
             order: tuple[str, ...] = TOOLS) -> str:
    """Times, RSS and bytes added from ``med`` (the timed rounds), device bytes from ``cnt``
    (the counted rounds' medians; "-" without one)."""
    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    def mb(m: dict[str, float], k: str) -> str:
        return f"{m[k] / 1e6:.0f}" if k in m else "-"
    peers = [t for t in order if t != "deltavault" and t in med]
    head = ("| scenario | tool | wall s | CPU s | peak RSS MiB | added MB | source read MB (own count) "
            "| repo written MB | repo read MB |" + "".join(f" wall / CPU / RSS / added vs {p} |" for p in peers))
    lines = [head, "|" + "---|" * (9 + len(peers))]
    for scen in scenarios:
        for t in (t for t in order if scen in med.get(t, {})):
            m, c = med[t][scen], cnt.get(t, {}).get(scen, {})
            own = f" ({c['source_bytes_read'] / 1e6:.0f})" if "source_bytes_read" in c else ""
            cells = [scen, f"**{t}**" if t == "deltavault" else t, f"{m['seconds']:.2f}", f"{m['cpu']:.2f}",
                     f"{m['rss_mib']:.0f}", mb(m, "bytes_added"), mb(c, "source_read") + own,
                     mb(c, "repo_written"), mb(c, "repo_read")]
            for p in peers:
                r = rat.get(scen, {}).get(p) if t == "deltavault" else None
                cells.append(" / ".join(x(r.get(k)) for k in ("seconds", "cpu", "rss_mib", "bytes_added"))
                             if r else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    ap.add_argument("--counted", type=int, default=1, help="cold rounds for the byte counts, after the timed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dv-bench-headline"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "headline.json")
    a = ap.parse_args()
    ds = a.datasets.resolve()
    compiled(sys.executable, dict(os.environ))  # no run pays for compiling deltavault's modules
    t0, load0 = time.time(), os.getloadavg()
    runs: dict[str, dict[str, list[dict[str, object]]]] = {t: {} for t in a.tools}
    counted: dict[str, dict[str, list[dict[str, object]]]] = {t: {} for t in a.tools}
    try:
        for rnd in range(a.rounds + a.counted):
            order = a.tools[rnd % len(a.tools):] + a.tools[:rnd % len(a.tools)]
            cold = rnd >= a.rounds
            label = f"counted round {rnd - a.rounds + 1}/{a.counted}" if cold else f"round {rnd + 1}/{a.rounds}"
            print(f"{label}: {' '.join(order)}", file=sys.stderr, flush=True)
            one_round(ds, a.work / "run", order, a.scenarios, counted if cold else runs, cold)
    finally:
        shutil.rmtree(a.work, ignore_errors=True)
    med = medians(runs)
    rat = ratios(med)
    cnt = medians(counted) if a.counted else {}
    table = markdown(med, rat, a.scenarios, cnt)
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
              "ended": time.strftime("%H:%M UTC", time.gmtime()), "minutes": round((time.time() - t0) / 60, 1),
              "load_average_start": load0, "load_average_end": os.getloadavg(), "cpus": os.cpu_count(),
              "rounds": a.rounds, "peers": DESCRIPTION, "interval_s": INTERVAL,
              "counted_rounds": a.counted, "medians": med, "ratios": rat, "counted_medians": cnt,
              "runs": runs, "counted": counted, "table": table}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table)
    print(f"\n{a.rounds} rounds + {a.counted} counted, {result['minutes']} min, load average {load0[0]:.2f} at the start; {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
