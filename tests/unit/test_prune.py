from __future__ import annotations

import os
import weakref
from pathlib import Path

import pytest

from deltavault.backends.local import LocalBackend
from deltavault.errors import CorruptionError, RepositoryLocked
from deltavault.maintenance.check import check_repository
from deltavault.maintenance.prune import PruneOptions, PruneReport, make_plan, prune, sweep
from deltavault.model.types import BlobType
from deltavault.repository.indexstore import IndexStore
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD
from tests.unit.test_prune_helpers import save_snapshot, snapshot_files

MiB = 1024 * 1024


def reopen(tmp_path: Path, cache_root: Path) -> Repository:
    return Repository.open(LocalBackend(tmp_path / "repo", fsync=False), lambda: PASSWORD, cache_root=cache_root)


def files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def pack_bytes(tmp_path: Path) -> int:
    return sum(p.stat().st_size for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file())


def rand(n: int) -> bytes:
    return os.urandom(n)


def test_prune_frees_forgotten_data_and_keeps_the_rest(make_repo, tmp_path: Path, cache_root: Path) -> None:
    repo = make_repo(pack_size=MiB)
    keep = {f"k{i}": rand(200_000) for i in range(6)}
    old_only = {f"o{i}": rand(200_000) for i in range(6)}
    s1 = save_snapshot(repo, {**keep, **old_only})
    s2 = save_snapshot(repo, keep)
    before = pack_bytes(tmp_path)
    repo.delete_snapshot(s1)
    rep = prune(reopen(tmp_path, cache_root))
    assert rep.packs_deleted >= 1 and rep.bytes_freed > 1_000_000
    after = pack_bytes(tmp_path)
    assert before - after > 1_000_000
    fresh = reopen(tmp_path, cache_root)
    assert snapshot_files(fresh, s2) == keep
    assert not check_repository(fresh, read_data=True).issues
    assert all(not fresh.has_blob(fresh.blob_id(d)) for d in old_only.values())


def test_prune_repacks_partly_used_packs(make_repo, tmp_path: Path, cache_root: Path) -> None:
    repo = make_repo(pack_size=4 * MiB)  # everything fits one data pack
    keep = {f"k{i}": rand(100_000) for i in range(3)}
    drop = {f"d{i}": rand(100_000) for i in range(7)}
    s1 = save_snapshot(repo, {**keep, **drop})
    s2 = save_snapshot(repo, keep)
    repo.delete_snapshot(s1)
    packs_before = set(reopen(tmp_path, cache_root).list_pack_names())
    rep = prune(reopen(tmp_path, cache_root), PruneOptions(repack_threshold=0.5))
    assert rep.packs_repack >= 1 and rep.blobs_repacked >= 3 and rep.packs_written >= 1
    fresh = reopen(tmp_path, cache_root)
    packs_after = set(fresh.list_pack_names())
    assert packs_before - packs_after, "the partly used pack is gone"
    assert snapshot_files(fresh, s2) == keep
    assert not check_repository(fresh, read_data=True).issues
    assert pack_bytes(tmp_path) < 600_000


def test_pack_under_threshold_is_kept_whole(make_repo, tmp_path: Path, cache_root: Path) -> None:
    repo = make_repo(pack_size=4 * MiB)
    keep = {f"k{i}": rand(100_000) for i in range(9)}
    s1 = save_snapshot(repo, {**keep, "d": rand(100_000)})
    save_snapshot(repo, keep)
    repo.delete_snapshot(s1)
    rep = prune(reopen(tmp_path, cache_root), PruneOptions(repack_threshold=0.5))
    assert rep.packs_repack == 0 and rep.bytes_unused_kept > 90_000


def test_dry_run_changes_nothing(make_repo, tmp_path: Path, cache_root: Path) -> None:
    repo = make_repo(pack_size=MiB)
    s1 = save_snapshot(repo, {"a": rand(300_000)})
    save_snapshot(repo, {"b": rand(300_000)})
    repo.delete_snapshot(s1)
    listing = files(tmp_path / "repo")
    rep = prune(reopen(tmp_path, cache_root), PruneOptions(dry_run=True))
    assert rep.dry_run and rep.packs_delete >= 1 and rep.bytes_freed > 250_000
    assert files(tmp_path / "repo") == listing


def test_backup_that_dedups_against_a_doomed_blob_during_the_plan_keeps_it(
        make_repo, tmp_path: Path, cache_root: Path) -> None:
    """The race prune must survive: a blob unused when the plan looked is reused by a
    backup that finishes before the sweep. The sweep's re-check keeps its pack."""
    repo = make_repo(pack_size=MiB)
    shared = rand(300_000)
    s1 = save_snapshot(repo, {"shared": shared, "x": rand(300_000)})
    save_snapshot(repo, {"y": rand(10_000)})
    repo.delete_snapshot(s1)
    pruner = reopen(tmp_path, cache_root)
    rep = PruneReport()
    with pruner.lock(command="prune (plan)"):
        plan = make_plan(pruner, PruneOptions(), rep, lambda _m: None)
    assert plan.delete, "the pack holding 'shared' is planned for deletion"
    # A concurrent backup (its own process view) loaded the index before the sweep:
    # 'shared' is still indexed, so it is deduplicated, not uploaded again.
    backup = reopen(tmp_path, cache_root)
    with backup.lock(command="backup"):
        assert backup.has_blob(backup.blob_id(shared))
        s3 = save_snapshot(backup, {"again": shared})
        assert backup.write_stats.bytes_added_stored < 100_000
    with pruner.lock(exclusive=True, command="prune (sweep)") as lk:
        sweep(pruner, plan, rep, lambda _m: None, still_held=lk.still_held)
    assert rep.new_snapshots_rechecked == 1 and rep.packs_resurrected >= 1
    fresh = reopen(tmp_path, cache_root)
    assert snapshot_files(fresh, s3) == {"again": shared}
    assert not check_repository(fresh, read_data=True).errors


def test_a_client_that_waited_for_its_lock_refreshes_its_index(make_repo, tmp_path: Path,
                                                               cache_root: Path) -> None:
    repo = make_repo(pack_size=MiB)
    gone = rand(300_000)
    s1 = save_snapshot(repo, {"gone": gone})
    save_snapshot(repo, {"b": rand(1000)})
    repo.delete_snapshot(s1)
    waiting = reopen(tmp_path, cache_root)  # opened (index loaded) before the prune
    assert waiting.has_blob(waiting.blob_id(gone))
    prune(reopen(tmp_path, cache_root))
    with waiting.lock(command="backup"):
        assert not waiting.has_blob(waiting.blob_id(gone)), "stale index entry survived the lock"
        s3 = save_snapshot(waiting, {"gone": gone})  # so it is uploaded again
    assert snapshot_files(reopen(tmp_path, cache_root), s3) == {"gone": gone}


def test_prune_refuses_when_referenced_blobs_are_missing(make_repo, tmp_path: Path, cache_root: Path) -> None:
    repo = make_repo(pack_size=MiB)
    save_snapshot(repo, {"a": rand(50_000)})
    for f in (tmp_path / "repo" / "index").iterdir():
        f.unlink()
    for f in (tmp_path / "repo" / "data").rglob("*"):
        if f.is_file():
            f.unlink()  # index and data gone: adoption cannot help
    listing = files(tmp_path / "repo")
    with pytest.raises(CorruptionError, match="Nothing was deleted"):
        prune(Repository.open(LocalBackend(tmp_path / "repo"), lambda: PASSWORD, use_cache=False))
    assert files(tmp_path / "repo") == listing


def test_prune_removes_orphans_of_a_crashed_backup(make_repo, tmp_path: Path, cache_root: Path) -> None:
    repo = make_repo(pack_size=MiB)
    s1 = save_snapshot(repo, {"a": rand(50_000)})
    indexed = {f.name for f in (tmp_path / "repo" / "index").iterdir()}
    crashed = reopen(tmp_path, cache_root)
    crashed.save_blob(BlobType.DATA, rand(2 * MiB))
    crashed.flush()
    for f in (tmp_path / "repo" / "index").iterdir():
        if f.name not in indexed:
            f.unlink()  # the run died after uploading its pack, before indexing it
    assert len(reopen(tmp_path, cache_root).list_pack_names()) == 3
    rep = prune(reopen(tmp_path, cache_root))
    assert rep.orphans_adopted == 1 and rep.packs_deleted == 1
    fresh = reopen(tmp_path, cache_root)
    assert len(fresh.list_pack_names()) == 2
    assert snapshot_files(fresh, s1)["a"]
    assert not check_repository(fresh, read_data=True).issues


def test_sweep_that_cannot_get_the_exclusive_lock_deletes_nothing(make_repo, tmp_path: Path,
                                                                  cache_root: Path) -> None:
    repo = make_repo(pack_size=MiB)
    s1 = save_snapshot(repo, {"a": rand(300_000)})
    save_snapshot(repo, {"b": rand(300_000)})
    repo.delete_snapshot(s1)
    backup = reopen(tmp_path, cache_root)
    listing = files(tmp_path / "repo")
    with backup.lock(command="backup"), pytest.raises(RepositoryLocked, match="deleted nothing"):
        prune(reopen(tmp_path, cache_root))
    assert set(listing) <= set(files(tmp_path / "repo"))
    assert prune(reopen(tmp_path, cache_root)).packs_deleted >= 1


def test_prune_removes_old_temporary_files_of_killed_writes(make_repo, tmp_path: Path, cache_root: Path) -> None:
    repo = make_repo(pack_size=MiB)
    s1 = save_snapshot(repo, {"a": rand(300_000)})
    pack = max((p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    # what LocalBackend.put leaves when killed between writing and renaming
    old = pack.parent / f".tmp-{pack.name}-0123456789ab"
    old.write_bytes(rand(100_000))
    hours_ago = old.stat().st_mtime - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    fresh = pack.parent / f".tmp-{pack.name}-ba9876543210"  # may be a live writer's
    fresh.write_bytes(b"x" * 1000)
    dry = prune(reopen(tmp_path, cache_root), PruneOptions(dry_run=True))
    assert (dry.temp_files_removed, dry.temp_bytes_removed) == (1, 100_000) and old.exists()
    rep = prune(reopen(tmp_path, cache_root))
    assert (rep.temp_files_removed, rep.temp_bytes_removed) == (1, 100_000)
    assert not old.exists() and fresh.exists()
    fresh_repo = reopen(tmp_path, cache_root)
    assert not check_repository(fresh_repo, read_data=True).issues
    assert s1 in fresh_repo.snapshot_ids()


def test_the_index_rebuilt_after_a_prune_does_not_coexist_with_the_old_one(
        make_repo, tmp_path: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The rebuild must not start while the old Index is still referenced (by the plan):
    # peak memory would be two whole indexes.
    repo = make_repo(pack_size=MiB)
    s1 = save_snapshot(repo, {f"o{i}": rand(200_000) for i in range(6)})
    save_snapshot(repo, {"k": rand(200_000)})
    repo.delete_snapshot(s1)
    repo = reopen(tmp_path, cache_root)
    old = weakref.ref(repo.index)
    alive_at_rebuild: list[bool] = []
    load = IndexStore.load

    def watched(self: IndexStore, *, tolerant: bool = False, names: list[str] | None = None) -> None:
        if len(self.index) == 0 and not alive_at_rebuild:
            alive_at_rebuild.append(old() is not None)
        load(self, tolerant=tolerant, names=names)

    monkeypatch.setattr(IndexStore, "load", watched)
    rep = prune(repo)
    assert rep.packs_deleted >= 1
    assert alive_at_rebuild == [False]
    assert repo.index is not None and len(repo.index) > 0
