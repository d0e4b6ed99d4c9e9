"""Concurrent clients: several "hosts" back up into one repository at the same time
(separate processes, caches and sources, partly identical content), while forget and prune
run in a loop. Backups take shared locks and never wait for each other; prune plans under a
shared lock and deletes under a brief exclusive one. Afterwards the repository checks clean
and every snapshot that was not forgotten restores byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import Cli, init_small_packs

HOSTS = 3
ROUNDS = 4


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def run(cli: Cli, *args: str, cache: Path | None = None) -> tuple[int, list[dict], str]:
    env = dict(cli.env)
    if cache is not None:
        env["DELTAVAULT_CACHE_DIR"] = str(cache)
    p = subprocess.run([sys.executable, "-m", "deltavault", "--json", *args], env=env,
                       capture_output=True, text=True, timeout=600)
    return p.returncode, [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")], p.stderr


def test_hosts_back_up_concurrently_while_prune_runs(cli: Cli, tmp_path: Path) -> None:
    init_small_packs(cli.repo, cli.password_file)
    expected: dict[str, dict[str, str]] = {}
    forgotten: set[str] = set()
    spans: list[tuple[float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(HOSTS)

    def host(h: int) -> None:
        rnd = random.Random(h)
        src = tmp_path / f"host{h}" / "data"
        src.mkdir(parents=True)
        for r in range(ROUNDS):
            (src / "own").write_bytes(rnd.randbytes(rnd.randrange(200_000, 2_000_000)))
            # the same bytes on every host: their uploads race to store one blob
            (src / "common").write_bytes(random.Random(1000 + r).randbytes(1_500_000))
            state = {f"data/{p.name}": sha(p.read_bytes()) for p in src.iterdir()}
            barrier.wait(timeout=120)
            t0 = time.monotonic()
            rc, out, err = run(cli, "backup", str(src), "--host", f"host{h}", "--lock-wait", "120",
                               cache=tmp_path / f"cache{h}")
            with lock:
                spans.append((t0, time.monotonic()))
                if rc != 0:
                    errors.append(f"host{h} round {r}: rc {rc}: {err}")
                    continue
                expected[[o for o in out if o["type"] == "summary"][-1]["snapshot"]] = state

    def pruner() -> None:
        for _ in range(3):
            time.sleep(random.uniform(0.5, 2.0))
            rc, out, err = run(cli, "forget", "--keep-last", "2", "--lock-wait", "120")
            if rc != 0:
                errors.append(f"forget: {err}")
                continue
            with lock:
                forgotten.update(o["snapshot"] for o in out if o.get("action") == "remove")
            rc, out, err = run(cli, "prune", "--lock-wait", "120", "--repack-threshold", "0.1")
            if rc != 0:
                errors.append(f"prune: {err}")

    threads = [threading.Thread(target=host, args=(h,)) for h in range(HOSTS)]
    threads.append(threading.Thread(target=pruner))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    assert len(expected) == HOSTS * ROUNDS
    overlapping = sum(1 for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1])
    assert overlapping >= ROUNDS, "backups did not run at the same time"

    rc, out, err = run(cli, "check", "--read-data")
    assert rc == 0, (out, err)
    rc, out, _ = run(cli, "snapshots")
    present = {o["id"] for o in out if o["type"] == "snapshot"}
    assert present == set(expected) - forgotten
    assert {o["hostname"] for o in out if o["type"] == "snapshot"} == {f"host{h}" for h in range(HOSTS)}
    for sid in sorted(present):
        target = tmp_path / "restore" / sid[:8]
        rc, _out, err = run(cli, "restore", sid, "--target", str(target))
        assert rc == 0, err
        got = {p.relative_to(target).as_posix(): sha(p.read_bytes()) for p in target.rglob("*") if p.is_file()}
        assert got == expected[sid], f"snapshot {sid[:8]} does not restore as backed up"
    # the last prune had nothing left to do but what the newest forget freed: no orphans, no garbage
    rc, out, _ = run(cli, "prune", "--dry-run")
    assert rc == 0
    assert os.listdir(cli.repo / "locks") == []
