"""Crash safety: the real CLI is SIGKILLed at random moments during backup, prune and
restore, over and over, against one repository.

After every trial: ``check`` passes; snapshots that existed keep their bytes (backup and
restore never touch stored objects; after a prune every snapshot is read back and
compared); a snapshot saved by a run that was killed late matches the source as it was.
After a killed backup that had uploaded packs, the rerun adds about only what had not been
uploaded. At the end every snapshot is restored with the CLI and compared byte for byte.

DELTAVAULT_CRASH_TRIALS sets the number of trials (default 200); DELTAVAULT_CRASH_REPORT
names a JSON file for the figures (bench/crash.py uses both).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltavault.backends.local import LocalBackend
from deltavault.maintenance.check import check_repository
from deltavault.model.nodes import NodeType
from deltavault.objects.reader import read_ref
from deltavault.objects.walk import walk
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli, init_small_packs

TRIALS = int(os.environ.get("DELTAVAULT_CRASH_TRIALS", "200"))
SEED = int(os.environ.get("DELTAVAULT_CRASH_SEED", str(random.randrange(1 << 30))))
FILES = 10
CRASHPOINT = Path(__file__).with_name("crashpoint.py")
KiB, MiB = 1024, 1024 * 1024
# Every CLI run here is under the documented memory limit (tests/memlimit.py): a run the
# kernel kills for memory fails the test instead of passing for one of the random kills.
pytestmark = pytest.mark.memory_limit


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Harness:
    def __init__(self, cli: Cli, tmp: Path, rnd: random.Random) -> None:
        self.cli = cli
        self.tmp = tmp
        self.rnd = rnd
        self.src = tmp / "src"
        self.src.mkdir()
        self.expected: dict[str, dict[str, str]] = {}  # snapshot -> path -> sha256
        self.dirty: dict[str, int] = {}  # files rewritten since the last saved snapshot
        self.est = {"backup": 1.0, "prune": 1.0, "restore": 1.0}
        self.ops: dict[str, int] = {}  # backend puts+deletes of the last whole run, per command
        self.stats = {"trials": 0, "killed": 0, "finished_before_kill": 0, "backup": 0, "prune": 0,
                      "restore": 0, "snapshots_saved_by_killed_runs": 0, "reuse_checks": 0,
                      "reuse_bytes_uploaded_before_kill": 0, "reuse_bytes_readded": 0, "reuse_bytes_new": 0,
                      "snapshot_verifications": 0, "check_runs": 0, "data_lost": 0,
                      "killed_at_op": 0, "killed_after_delay": 0}

    # ------------------------------------------------------------- source and repository
    def mutate(self, n: int) -> None:
        for _ in range(n):
            name = f"f{self.rnd.randrange(FILES):02d}"
            size = self.rnd.randrange(64 * KiB, 3 * MiB)
            (self.src / name).write_bytes(self.rnd.randbytes(size))
            self.dirty[name] = size

    def source_state(self) -> dict[str, str]:
        return {f"src/{p.name}": sha(p.read_bytes()) for p in sorted(self.src.iterdir())}

    def repo(self) -> Repository:
        return Repository.open(LocalBackend(self.cli.repo, fsync=False), lambda: PASSWORD, use_cache=False)

    def listing(self) -> dict[str, tuple[int, int]]:
        out = {}
        for p in self.cli.repo.rglob("*"):
            rel = p.relative_to(self.cli.repo).as_posix()
            if p.is_file() and not rel.startswith("locks/") and not p.name.startswith(".tmp"):
                st = p.stat()
                out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def pack_bytes(self) -> int:
        return sum(s for n, (s, _m) in self.listing().items() if n.startswith("data/"))

    # ------------------------------------------------------------- running and killing
    def run_killed(self, op: str, args: list[str], *, kill: bool = True) -> bool:
        """Run the CLI and SIGKILL it: either after a random delay (from outside), or at a
        random backend put/delete (from inside: before it, with its temp file half written,
        or right after it). True when it was killed."""
        env = dict(self.cli.env)
        count_file = self.tmp / "ops-count"
        count_file.unlink(missing_ok=True)
        env["DV_COUNT_FILE"] = str(count_file)
        # A command that made no backend writes (a restore, a prune with nothing to do) has
        # no operation to be killed at: only a delay can kill it.
        by_op = kill and self.ops.get(op, 0) > 0 and self.rnd.random() < 0.5
        delay = self.rnd.uniform(0.0, self.est[op]) if kill else 600.0
        if by_op:
            env["DV_KILL_AT"] = str(self.rnd.randint(1, self.ops[op]))
            env["DV_KILL_PHASE"] = phase = self.rnd.choice(["before", "mid", "after"])
            self.stats[f"kill_at_op_{phase}"] = self.stats.get(f"kill_at_op_{phase}", 0) + 1
            delay = 120.0
        t0 = time.monotonic()
        out = (self.tmp / "stdout").open("wb")
        memory = self.cli.memory
        assert memory is not None, "the crash trials run under the memory limit"
        p = memory.popen([sys.executable, str(CRASHPOINT), *args], env=env,
                         stdout=out, stderr=subprocess.PIPE)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        out.close()
        memory.finish(p)
        self.stdout = (self.tmp / "stdout").read_text()
        killed = p.returncode == -signal.SIGKILL
        stderr = p.stderr.read().decode() if p.stderr else ""
        if p.stderr:
            p.stderr.close()
        if killed:
            self.stats["killed"] += 1
            self.stats["killed_at_op" if by_op else "killed_after_delay"] += 1
        else:
            self.stats["finished_before_kill"] += 1
            assert p.returncode == 0, f"{op} failed on its own ({p.returncode}):\n{stderr}"
            self.est[op] = max(0.3, 0.7 * self.est[op] + 0.3 * 1.2 * (time.monotonic() - t0))
            if count_file.exists():
                n = int(count_file.read_text())
                self.ops[op] = max(n, self.ops.get(op, 0) // 2)
        return killed

    # ------------------------------------------------------------- checks
    def verify_snapshot(self, repo: Repository, sid: str) -> None:
        snap = repo.load_snapshot(sid)
        assert snap.tree is not None
        got = {}
        for path, node in walk(repo, snap.tree):
            if node.type == NodeType.FILE:
                got[path.decode()] = sha(b"".join(read_ref(repo, r) or b"" for r in node.content))
        if got != self.expected[sid]:
            self.stats["data_lost"] += 1
        assert got == self.expected[sid], f"snapshot {sid[:8]} does not hold what was backed up"
        self.stats["snapshot_verifications"] += 1

    def check(self, repo: Repository, *, read_data: bool = False) -> None:
        rep = check_repository(repo, read_data=read_data)
        self.stats["check_runs"] += 1
        assert not rep.errors, [i.message for i in rep.errors]

    # ------------------------------------------------------------- operations
    def backup(self, *, kill: bool = True) -> tuple[bool, set[str]]:
        state = self.source_state()
        before = set(self.repo().snapshot_ids())
        args = ["backup", str(self.src), "--json"]
        killed = self.run_killed("backup", args, kill=kill)
        if not killed:
            self.last_summary = [json.loads(x) for x in self.stdout.splitlines() if '"summary"' in x][-1]
        new = set(self.repo().snapshot_ids()) - before
        assert len(new) <= 1
        for sid in new:
            self.expected[sid] = state
            self.dirty.clear()
            if killed:
                self.stats["snapshots_saved_by_killed_runs"] += 1
        return killed, new

    def trial_backup(self) -> None:
        self.stats["backup"] += 1
        self.mutate(self.rnd.randrange(1, 5))
        new_bytes = sum(self.dirty.values())
        old = self.listing()
        p0 = self.pack_bytes()
        killed, new = self.backup()
        after = self.listing()
        changed = [n for n, v in old.items() if after.get(n) != v]
        assert not changed, f"a backup changed or removed stored objects: {changed[:5]}"
        repo = self.repo()
        self.check(repo)
        for sid in new:
            self.verify_snapshot(repo, sid)
        uploaded = self.pack_bytes() - p0
        if killed and not new and uploaded > 0:
            # The next backup must reuse what the killed one uploaded.
            self.backup(kill=False)
            added = self.last_summary["bytes_added"]
            self.stats["reuse_checks"] += 1
            self.stats["reuse_bytes_uploaded_before_kill"] += uploaded
            self.stats["reuse_bytes_readded"] += added
            self.stats["reuse_bytes_new"] += new_bytes
            limit = new_bytes - uploaded + 0.05 * new_bytes + 512 * KiB
            assert added <= limit, (f"rerun added {added} bytes; {new_bytes} new, {uploaded} already "
                                    f"uploaded by the killed run")
            repo = self.repo()
            self.check(repo)
            self.verify_snapshot(repo, max(repo.snapshot_ids(), key=lambda s: repo.load_snapshot(s).time_ns))

    def trial_prune(self) -> None:
        self.stats["prune"] += 1
        repo = self.repo()
        snaps = repo.list_snapshots()
        for sid, _s in snaps[:-3]:  # forget all but the newest three
            repo.delete_snapshot(sid)
            self.expected.pop(sid, None)
        self.run_killed("prune", ["prune", "--repack-threshold", "0.1"])
        repo = self.repo()
        self.check(repo)
        for sid in repo.snapshot_ids():
            self.verify_snapshot(repo, sid)

    def trial_restore(self) -> None:
        self.stats["restore"] += 1
        ids = sorted(self.expected)
        if not ids:
            return
        target = self.tmp / "restore"
        before = self.listing()
        self.run_killed("restore", ["restore", self.rnd.choice(ids), "--target", str(target)])
        shutil.rmtree(target, ignore_errors=True)
        assert self.listing() == before, "a restore changed the repository"
        self.check(self.repo())

    def clean_temp_files(self) -> None:
        """Temporary files of puts that were killed: prune removes them once they are old."""
        temps = [p for p in self.cli.repo.rglob(".tmp-*") if p.is_file()]
        self.stats["temp_files_left_by_kills"] = len(temps)
        hour_ago = time.time() - 2 * 3600
        for p in temps:
            os.utime(p, (hour_ago, hour_ago))
        r = self.cli("prune", "--json")
        assert r.returncode == 0, r.stderr
        summary = [json.loads(line) for line in r.stdout.splitlines() if '"prune_summary"' in line][-1]
        assert summary["temp_files_removed"] == len(temps)
        assert not list(self.cli.repo.rglob(".tmp-*"))

    def final(self) -> None:
        repo = self.repo()
        self.check(repo, read_data=True)
        for sid in sorted(repo.snapshot_ids()):
            target = self.tmp / f"final-{sid[:8]}"
            r = self.cli("restore", sid, "--target", str(target))
            assert r.returncode == 0, r.stderr
            got = {f"{p.relative_to(target).as_posix()}": sha(p.read_bytes())
                   for p in target.rglob("*") if p.is_file()}
            if got != self.expected[sid]:
                self.stats["data_lost"] += 1
            assert got == self.expected[sid]
            shutil.rmtree(target)
        self.clean_temp_files()
        self.check(self.repo(), read_data=True)
        # and the repository still takes backups
        self.mutate(1)
        _killed, new = self.backup(kill=False)
        assert new


@pytest.mark.timeout(1800)
def test_sigkill_at_random_points(cli: Cli, tmp_path: Path) -> None:
    rnd = random.Random(SEED)
    print(f"crash test seed {SEED} trials {TRIALS}")
    init_small_packs(cli.repo, cli.password_file)
    run_trials(Harness(cli, tmp_path, rnd), rnd, TRIALS)


def run_trials(h: Harness, rnd: random.Random, trials: int) -> None:
    """The random kills, the checks after each, and the final restores (any backend)."""
    h.mutate(FILES)
    h.backup(kill=False)
    for i in range(trials):
        h.stats["trials"] += 1
        roll = rnd.random()
        if roll < 0.6:
            h.trial_backup()
        elif roll < 0.8:
            h.trial_prune()
        else:
            h.trial_restore()
        if i % 25 == 24:
            h.check(h.repo(), read_data=True)
    h.final()
    h.stats["seed"] = SEED
    report = os.environ.get("DELTAVAULT_CRASH_REPORT")
    if report:
        Path(report).write_text(json.dumps(h.stats, indent=2))
    print(json.dumps(h.stats))
    assert h.stats["data_lost"] == 0
    assert h.stats["killed"] >= trials // 2, h.stats  # most runs really were killed part way
    if trials >= 100:
        assert h.stats["reuse_checks"] >= 3, h.stats  # the reuse assertion was exercised
