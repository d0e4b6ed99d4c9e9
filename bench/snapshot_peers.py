"""restic and borg repositories of many snapshots, made by their own CLIs (bench/scale_snapshots.py).

Each peer backs up a tiny tree (20 files in 3 directories, as deltavault's build) one
``backup``/``create`` at a time, on the settings of bench/peers.py; nothing is written in a
peer's format by hand. Snapshot k gets the time ``base + k * 97 minutes`` (restic
``--time``, borg ``--timestamp``), ``base`` chosen at the first build so that the newest
snapshot of ``--peer-snapshots``' largest count is in the past: the calendar rules of
``forget``/``prune`` have days, weeks, months and years to fill, as in deltavault's
repository. The repository grows from one count of the curve to the next (a state file
records how far it got); at each count the newest snapshot is of the tree's second state
(one file changed, one added, one removed), the others of the first, so ``diff`` of the
two newest has changes to show. restic runs ``backup --force`` while building: it skips
the search for a parent snapshot, which reads every snapshot and would make the build
quadratic; the tree is tiny, so reading it again costs nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from peers import BORG_CREATE, BORG_INIT, RESTIC_BACKUP, RESTIC_INIT

PASSWORD = "bench"
STEP_S = 97 * 60
PEERS = ("restic", "borg")


def peer_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESTIC_", "BORG_"))}
    env.update(RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=str(work / "restic-cache"),
               BORG_PASSPHRASE=PASSWORD, BORG_BASE_DIR=str(work / "borg-base"))
    return env


def _state_a(src: Path) -> None:
    for i in range(20):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    (src / "d1" / "new.txt").unlink(missing_ok=True)


def _state_b(src: Path) -> None:
    (src / "d0" / "f0.txt").write_text("changed\n")
    (src / "d1" / "new.txt").write_text("added\n")
    (src / "d2" / "f2.txt").unlink(missing_ok=True)


def _restic_backup(repo: Path, src: Path, k: int, t: float) -> list[str]:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    return ["restic", "-r", str(repo), "backup", "-q", "--force", "--host", "bench", *RESTIC_BACKUP,
            "--time", when, src.name]  # relative (run in its parent): /tmp's times are not in the tree


def _borg_backup(repo: Path, src: Path, k: int, t: float) -> list[str]:
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return ["borg", "create", *BORG_CREATE, "--timestamp", when, f"{repo}::s{k:05}", str(src)]


def _init(peer: str, repo: Path) -> list[str]:
    if peer == "restic":
        return ["restic", "-r", str(repo), "init", *RESTIC_INIT]
    return ["borg", "init", *BORG_INIT, str(repo)]


def count(peer: str, work: Path) -> int:
    """How many snapshots ``peer``'s repository under ``work`` holds (0: none yet)."""
    state_file = work / peer / "state.json"
    return int(json.loads(state_file.read_text())["count"]) if state_file.exists() else 0


def build(peer: str, work: Path, count: int, newest: int, budget_s: float) -> dict[str, object] | None:
    """Grow ``peer``'s repository under ``work`` to ``count`` snapshots; ``newest`` is the
    largest count the curve asks for (it fixes the times). None if the build would not end
    within ``budget_s`` seconds at the rate measured so far (the repository stays as it is)."""
    root = work / peer
    repo, src, state_file = root / "repo", root / "src", root / "state.json"
    env = peer_env(work)
    if state_file.exists():
        state = json.loads(state_file.read_text())
    else:
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(_init(peer, repo), env=env, check=True, capture_output=True)
        state = {"count": 0, "base": time.time() - (newest + 1) * STEP_S, "build_s": 0.0, "ids": {}, "tree": ""}
    have = int(state["count"])
    if have >= count:
        return state
    if have and float(state["build_s"]) / have * (count - have) > budget_s:
        return None
    backup: Callable[[Path, Path, int, float], list[str]] = _restic_backup if peer == "restic" else _borg_backup
    t0 = time.monotonic()
    for k in range(have, count):
        want = "b" if k == count - 1 else "a"
        if state["tree"] != want:  # only then: a file written anew is a new tree for both peers
            (_state_b if want == "b" else _state_a)(src)
            state["tree"] = want
        subprocess.run(backup(repo, src, k, float(state["base"]) + k * STEP_S), env=env, check=True,
                       capture_output=True, cwd=root)
        if (k + 1) % 250 == 0:
            rate = (time.monotonic() - t0) / (k + 1 - have)
            print(f"  {peer}: {k + 1} snapshots, {rate:.2f} s each", file=sys.stderr, flush=True)
    state["build_s"] = float(state["build_s"]) + time.monotonic() - t0
    state["count"] = count
    state["ids"] = dict(zip(("a", "b"), newest_two(peer, repo, env), strict=True))
    state_file.write_text(json.dumps(state))
    print(f"  {peer}: {count} snapshots, built in {state['build_s']:.0f} s in all", file=sys.stderr, flush=True)
    return state


def newest_two(peer: str, repo: Path, env: dict[str, str]) -> list[str]:
    if peer == "restic":
        out = subprocess.run(["restic", "-r", str(repo), "snapshots", "--json"], env=env, check=True,
                             capture_output=True, text=True).stdout
        snaps = sorted(json.loads(out), key=lambda s: s["time"])
        return [s["id"] for s in snaps[-2:]]
    out = subprocess.run(["borg", "list", "--json", str(repo)], env=env, check=True,
                         capture_output=True, text=True).stdout
    archives = sorted(json.loads(out)["archives"], key=lambda a: a["time"])
    return [a["name"] for a in archives[-2:]]


CALENDAR = ["--keep-daily", "7", "--keep-weekly", "5", "--keep-monthly", "12", "--keep-yearly", "3"]


def commands(peer: str, work: Path, ids: dict[str, str]) -> dict[str, list[str]]:
    """The commands of bench/scale_snapshots.py, by the same names, in the peer's words."""
    repo = str(work / peer / "repo")
    if peer == "restic":
        r = ["restic", "-r", repo]
        return {"snapshots": [*r, "snapshots"],
                "forget --keep-last 5 --dry-run": [*r, "forget", "--keep-last", "5", "--dry-run"],
                "forget --keep-daily.. --dry-run": [*r, "forget", *CALENDAR, "--dry-run"],
                "diff A B": [*r, "diff", ids["a"], ids["b"]]}
    return {"snapshots": ["borg", "list", repo],
            "forget --keep-last 5 --dry-run": ["borg", "prune", "--dry-run", "--list", "--keep-last", "5", repo],
            "forget --keep-daily.. --dry-run": ["borg", "prune", "--dry-run", "--list", *CALENDAR, repo],
            "diff A B": ["borg", "diff", f"{repo}::{ids['a']}", ids["b"]]}
