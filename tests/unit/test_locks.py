from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import msgspec
import pytest

from deltavault.errors import RepositoryLocked
from deltavault.model.snapshot import Snapshot
from deltavault.repository.locks import LOCK_AAD, STALE_AFTER, LockInfo
from deltavault.repository.repository import Repository


def plant_lock(repo: Repository, **kw: object) -> str:
    now = time.time()
    fields: dict[str, object] = dict(hostname="elsewhere", pid=1, pid_start=0, exclusive=True, created=now,
                                     refreshed=now, command="prune")
    fields.update(kw)
    info = LockInfo(**fields)  # type: ignore[arg-type]
    name = f"locks/{os.urandom(8).hex()}"
    repo.backend.put(name, repo.env.seal(msgspec.json.encode(info), aad=LOCK_AAD))
    return name


def test_shared_locks_never_block_each_other(repo: Repository) -> None:
    with repo.lock(command="backup a"), repo.lock(command="backup b"), repo.lock(command="check"):
        assert len(repo.locks.list_locks()) == 3


def test_exclusive_waits_for_shared_and_shared_for_exclusive(repo: Repository) -> None:
    with repo.lock(command="backup"), pytest.raises(RepositoryLocked, match="locked shared"):
        repo.lock(exclusive=True, command="prune")
    with repo.lock(exclusive=True, command="prune"), pytest.raises(RepositoryLocked, match="exclusively"):
        repo.lock(command="backup")
    assert repo.locks.list_locks() == []


def test_lock_of_another_host_is_stale_only_after_stale_after(repo: Repository) -> None:
    name = plant_lock(repo, hostname="other-host", pid=os.getpid() + 10_000_000)
    with pytest.raises(RepositoryLocked, match="other-host"):
        repo.lock(command="backup")
    repo.backend.delete(name)
    old = time.time() - STALE_AFTER - 5
    plant_lock(repo, hostname="other-host", created=old, refreshed=old)
    with repo.lock(command="backup"):
        assert len(repo.locks.list_locks()) == 1  # the stale one was removed


def test_same_host_name_other_boot_is_not_judged_by_pid(repo: Repository) -> None:
    plant_lock(repo, hostname=repo.locks.hostname, pid=999_999_999, boot_id="another-machine")
    with pytest.raises(RepositoryLocked):
        repo.lock(command="backup")


def test_lock_of_a_dead_local_process_is_cleared_at_once(repo: Repository) -> None:
    plant_lock(repo, hostname=repo.locks.hostname, pid=999_999_999, boot_id=repo.locks.boot_id)
    with repo.lock(exclusive=True, command="prune"):
        pass


def _holder(tmp_path: Path) -> subprocess.Popen[str]:
    code = textwrap.dedent(f"""
        import sys, time
        from deltavault.backends.local import LocalBackend
        from deltavault.repository.repository import Repository
        r = Repository.open(LocalBackend({str(tmp_path / 'repo')!r}), lambda: b"test password", use_cache=False)
        lk = r.lock(command="backup")
        print("locked", flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_sigkilled_holder_lock_is_cleared_at_once(repo: Repository, tmp_path: Path, reap: bool) -> None:
    p = _holder(tmp_path)
    try:
        with pytest.raises(RepositoryLocked):
            repo.lock(exclusive=True, command="prune")
        os.kill(p.pid, signal.SIGKILL)
        if reap:
            p.wait()
        else:
            _until_zombie(p.pid)  # dead but not reaped: a zombie still answers kill(pid, 0)
        with repo.lock(exclusive=True, command="prune"):  # not waiting: a live holder's lock raises
            pass
    finally:
        p.kill()
        p.wait()


def test_wait_for_a_lock_released_meanwhile(repo: Repository, tmp_path: Path) -> None:
    p = _holder(tmp_path)
    try:
        t = time.monotonic()
        threading.Timer(1.0, p.kill).start()
        with repo.lock(exclusive=True, command="prune", wait=20):
            assert 0.9 < time.monotonic() - t < 20
    finally:
        p.kill()
        p.wait()


def test_lost_lock_is_noticed_and_blocks_the_snapshot(repo: Repository) -> None:
    lk = repo.lock(command="backup")
    assert lk.still_held()
    repo.backend.delete(lk.name)  # a peer judged it stale and removed it
    assert not lk.still_held()
    lk.refresh()  # must not resurrect it
    assert repo.locks.list_locks() == []
    with pytest.raises(RepositoryLocked, match="removed by another process"):
        repo.save_snapshot(Snapshot(time="t", time_ns=1, hostname="h"))
    lk.release()
    repo.save_snapshot(Snapshot(time="t", time_ns=1, hostname="h"))  # released locks do not count


def test_refresh_keeps_the_lock_fresh(repo: Repository) -> None:
    clock = [1000.0]
    repo.locks.clock = lambda: clock[0]
    lk = repo.lock(command="backup")
    clock[0] += STALE_AFTER - 10
    lk.refresh()
    clock[0] += 20  # past STALE_AFTER since creation, not since the refresh
    assert not repo.locks.is_stale(repo.locks.list_locks()[0][1])
    lk.release()


def _until_zombie(pid: int) -> None:
    """Wait for a SIGKILLed child to have exited (state Z), however loaded the machine."""
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not die"
        time.sleep(0.01)
