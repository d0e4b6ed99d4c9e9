"""The repository against a misbehaving store (deltavault.testing.faulty.FaultyBackend over
MemoryBackend): transient errors, a failing put, a torn object, eventual listings. Whatever
the store does, nothing already stored is lost, and damage is found, not read as data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deltavault.backends.retry import RetryingBackend
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.errors import BackendError
from deltavault.maintenance.check import check_repository
from deltavault.maintenance.repair import repair
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from deltavault.testing.faulty import Fault, FaultyBackend
from deltavault.testing.memory import MemoryBackend
from tests.conftest import FAST_SCRYPT, PASSWORD
from tests.treeutil import manifest


def _tree(root: Path, seed: int, files: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rnd = __import__("random").Random(seed)
    for i in range(files):
        (root / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 900_000)))
    return root


def _open(store: object, tmp: Path) -> Repository:
    return Repository.open(store, lambda: PASSWORD, cache_root=tmp / "cache")  # type: ignore[arg-type]


def _init(store: object, tmp: Path) -> Repository:
    return Repository.init(store, PASSWORD, scrypt=FAST_SCRYPT, pack_size=1024 * 1024,  # type: ignore[arg-type]
                           cache_root=tmp / "cache")


def _restored(repo: Repository, tree: bytes | None, out: Path) -> dict:  # type: ignore[type-arg]
    assert tree is not None
    FileRestorer(repo, out, RestoreOptions(verify=True)).run(tree)
    return manifest(out / "src")


def test_transient_errors_everywhere_are_retried_to_a_sound_repository(tmp_path: Path) -> None:
    mem = MemoryBackend()
    flaky = Fault(ops=("get", "put", "list", "stat"), action="error", probability=0.3, retryable=True)
    store = RetryingBackend(FaultyBackend(mem, [flaky], seed=3), attempts=8, sleep=lambda _s: None)
    repo = _init(store, tmp_path)
    src = _tree(tmp_path / "src", 1, files=16)
    res = run_backup(repo, BackupRequest(paths=[str(src)]))
    assert not res.problems
    fresh = _open(store, tmp_path / "fresh")
    assert _restored(fresh, res.snapshot.tree, tmp_path / "out") == manifest(src)
    assert flaky.fired >= 8  # the faults did happen, on the way in and on the way out
    assert not check_repository(_open(mem, tmp_path / "clean"), read_data=True).errors


def test_a_put_that_keeps_failing_ends_the_run_and_keeps_what_was_stored(tmp_path: Path) -> None:
    mem = MemoryBackend()
    repo = _init(mem, tmp_path)
    src = _tree(tmp_path / "src", 2)
    first = run_backup(repo, BackupRequest(paths=[str(src)]))
    _tree(src, 3)  # new content: new packs to put
    dead = Fault(ops=("put",), prefix="data/", action="error", retryable=False, message="disk gone")
    broken = _open(FaultyBackend(mem, [dead]), tmp_path)
    with pytest.raises(BackendError, match="disk gone"):
        run_backup(broken, BackupRequest(paths=[str(src)]))
    after = _open(mem, tmp_path / "after")
    assert [sid for sid, _ in after.list_snapshots()] == [first.snapshot_id]
    assert not check_repository(after, read_data=True).errors
    assert _restored(after, first.snapshot.tree, tmp_path / "out")  # the first snapshot restores
    again = run_backup(after, BackupRequest(paths=[str(src)]))  # and the next run completes
    assert _restored(after, again.snapshot.tree, tmp_path / "out2") == manifest(src)


def test_a_torn_pack_is_found_by_check_and_its_good_blobs_saved_by_repair(tmp_path: Path) -> None:
    mem = MemoryBackend()
    torn = Fault(ops=("put",), prefix="data/", nth=2, action="torn")
    repo = _init(FaultyBackend(mem, [torn]), tmp_path)
    src = _tree(tmp_path / "src", 4, files=10)
    res = run_backup(repo, BackupRequest(paths=[str(src)]))
    assert torn.fired == 1
    reader = _open(mem, tmp_path / "r")
    rep = check_repository(reader, read_data=True)
    assert any("does not match its name" in i.message for i in rep.errors)
    assert rep.affected  # the files whose data was in the torn pack are named
    fixed = repair(_open(mem, tmp_path / "r2"), rewrite=True)
    assert fixed.packs_salvaged and fixed.rewritten
    final = _open(mem, tmp_path / "r3")
    assert not check_repository(final, read_data=True).errors
    # every file that did not lose data restores exactly; the others read as zeros and are marked
    ((_sid, snap),) = final.list_snapshots()
    got = _restored(final, snap.tree, tmp_path / "out")
    lost = {os.fsencode(p.rsplit("/", 1)[-1]) for paths in rep.affected.values() for p in paths}
    want = manifest(src)
    assert lost and lost < set(want)
    assert {k: v for k, v in got.items() if k not in lost} == {k: v for k, v in want.items() if k not in lost}
    assert all("user.deltavault.damaged" in got[k]["xattrs"] for k in lost)
    assert res.snapshot_id not in {sid for sid, _ in final.list_snapshots()}


def test_eventual_listings_cost_dedup_never_data(tmp_path: Path) -> None:
    mem = MemoryBackend()
    now = [0.0]
    lagging = FaultyBackend(mem, eventual=60.0, clock=lambda: now[0])
    repo = _init(lagging, tmp_path)
    now[0] = 100.0  # config and key are listed by now
    src = _tree(tmp_path / "src", 5)
    first = run_backup(repo, BackupRequest(paths=[str(src)]))
    # A second client opens while the first's index and snapshot are not listed yet: it sees
    # no previous snapshot and no index, so it stores everything again.
    other = _open(lagging, tmp_path / "other")
    assert other.list_snapshots() == [] and len(other.index) == 0
    second = run_backup(other, BackupRequest(paths=[str(src)], use_catalog=False))
    assert second.change_source == "none"
    now[0] = 200.0  # the listings catch up
    final = _open(lagging, tmp_path / "final")
    assert {first.snapshot_id, second.snapshot_id} == {sid for sid, _ in final.list_snapshots()}
    assert not check_repository(final, read_data=True).errors
    for i, res in enumerate((first, second)):
        assert _restored(final, res.snapshot.tree, tmp_path / f"out{i}") == manifest(src)
    assert os.path.exists(src)
