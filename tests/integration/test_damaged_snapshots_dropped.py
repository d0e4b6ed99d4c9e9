"""A store that answers snapshots with tens of MiB of random bytes each (docs/design.md,
"A store that lies"): every damaged one's bytes stayed in memory until the listing ended,
kept by the error that named it (repository/cache.py). Now a damaged answer is dropped once
refused; the command reports them as before."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

from deltavault.backends.local import LocalBackend
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli, init_and_back_up

MiB = 1024 * 1024
SIZE = 24 * MiB  # ten of them: 240 MiB
COUNT = 10


def plant(repo: Path) -> set[str]:
    names = set()
    for _ in range(COUNT):
        sid = os.urandom(32).hex()
        (repo / "snapshots" / sid).write_bytes(os.urandom(SIZE))
        names.add(sid)
    return names


def test_snapshots_of_random_bytes_are_not_kept_once_refused(cli: Cli, tmp_path: Path) -> None:
    init_and_back_up(cli, tmp_path / "src", {"a": os.urandom(100_000)})
    assert cli("backup", str(tmp_path / "src")).returncode == 0
    planted = plant(cli.repo)

    repo = Repository.open(LocalBackend(cli.repo, fsync=False), lambda: PASSWORD, use_cache=False, tolerant=True)
    tracemalloc.start()
    try:
        listed = repo.snapshots.list()
        held_after, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(listed) == 2
    assert set(repo.snapshots.damaged) == planted
    assert all("content does not match its name (damaged)" in m for m in repo.snapshots.damaged.values())
    # Refused answers are dropped: before, the ten stayed held through their errors (240 MiB).
    assert held_after < 8 * MiB, f"{held_after >> 20} MiB still held after listing"

    # The command's report is what it was: a warning per damaged snapshot, exit 0.
    r = cli("--json", "--no-cache", "snapshots")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    warned = {m["message"].split()[1] for m in lines if m["type"] == "warning"}
    assert warned == {sid[:8] for sid in planted}
    assert all("cannot be read and was left out" in m["message"] and "run 'deltavault check'" in m["message"]
               for m in lines if m["type"] == "warning")
    assert sum(m["type"] == "snapshot" for m in lines) == 2
