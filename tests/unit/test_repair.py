from __future__ import annotations

import os
from pathlib import Path

from deltavault.backends.local import LocalBackend
from deltavault.maintenance.check import check_repository
from deltavault.maintenance.repair import DAMAGED_XATTR, repair
from deltavault.model.content import Hole
from deltavault.model.nodes import NodeType
from deltavault.objects.walk import walk
from deltavault.repository.pack import pack_name
from deltavault.repository.repository import Repository
from deltavault.testing.faulty import Fault, FaultyBackend
from tests.conftest import PASSWORD
from tests.unit.test_prune_helpers import save_snapshot, snapshot_files

MiB = 1024 * 1024


def open_tolerant(tmp_path: Path) -> Repository:
    return Repository.open(LocalBackend(tmp_path / "repo", fsync=False), lambda: PASSWORD,
                           use_cache=False, tolerant=True)


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def two_snapshots(make_repo) -> tuple[Repository, dict[str, bytes], dict[str, bytes], str, str]:
    repo = make_repo(pack_size=MiB)
    a = {f"a{i}": os.urandom(150_000) for i in range(8)}
    b = {f"b{i}": os.urandom(150_000) for i in range(8)}
    return repo, a, b, save_snapshot(repo, a), save_snapshot(repo, b)


def test_damaged_index_file_is_rebuilt_from_pack_headers(make_repo, tmp_path: Path) -> None:
    _repo, a, b, s1, s2 = two_snapshots(make_repo)
    for f in (tmp_path / "repo" / "index").iterdir():
        flip(f, 40)
    r = open_tolerant(tmp_path)
    assert r.index_errors
    rep = repair(r)
    assert rep.blobs_lost == 0 and not rep.affected and rep.index_files_removed >= 2
    fresh = open_tolerant(tmp_path)
    assert not fresh.index_errors
    assert snapshot_files(fresh, s1) == a and snapshot_files(fresh, s2) == b
    assert not check_repository(fresh, read_data=True).issues


def test_lost_blob_is_reported_with_its_snapshot_and_path_and_rest_survives(make_repo, tmp_path: Path) -> None:
    repo, a, b, s1, s2 = two_snapshots(make_repo)
    victim = repo.index.lookup(repo.blob_id(a["a3"]))
    assert victim is not None
    flip(tmp_path / "repo" / pack_name(victim.pack_id), victim.offset + 100)
    rep = repair(open_tolerant(tmp_path))
    assert rep.blobs_lost == 1 and len(rep.packs_salvaged) == 1
    assert rep.affected == {s1: ["a3"]}
    fresh = open_tolerant(tmp_path)
    assert snapshot_files(fresh, s2) == b
    assert not fresh.has_blob(repo.blob_id(a["a3"]))
    report = check_repository(fresh, read_data=True)
    assert not [i for i in report.errors if i.kind in ("pack", "blob", "index")]  # storage is clean again
    assert report.affected == {s1: ["a3"]}


def test_rewrite_marks_damaged_files_and_keeps_sizes(make_repo, tmp_path: Path) -> None:
    repo, a, _b, s1, _s2 = two_snapshots(make_repo)
    victim = repo.index.lookup(repo.blob_id(a["a5"]))
    assert victim is not None
    flip(tmp_path / "repo" / pack_name(victim.pack_id), victim.offset + 7)
    rep = repair(open_tolerant(tmp_path), rewrite=True)
    new = rep.rewritten[s1]
    fresh = open_tolerant(tmp_path)
    assert s1 not in fresh.snapshot_ids()
    snap = fresh.load_snapshot(new)
    assert "repaired" in snap.tags and snap.parent == s1
    assert snap.tree is not None
    nodes = {p.decode(): n for p, n in walk(fresh, snap.tree) if n.type == NodeType.FILE}
    assert dict(nodes["a5"].xattrs)[DAMAGED_XATTR]
    assert nodes["a5"].content == [Hole(150_000)]
    files = snapshot_files(fresh, new)
    assert {k: v for k, v in files.items() if k != "a5"} == {k: v for k, v in a.items() if k != "a5"}
    assert not check_repository(fresh, read_data=True).errors


def test_damaged_pack_header_is_salvaged_through_the_old_index(make_repo, tmp_path: Path) -> None:
    repo, a, _b, s1, _s2 = two_snapshots(make_repo)
    loc = repo.index.lookup(repo.blob_id(a["a0"]))
    assert loc is not None
    path = tmp_path / "repo" / pack_name(loc.pack_id)
    flip(path, path.stat().st_size - 30)  # inside the sealed header
    rep = repair(open_tolerant(tmp_path))
    assert rep.packs_salvaged and rep.blobs_lost == 0 and not rep.affected
    fresh = open_tolerant(tmp_path)
    assert snapshot_files(fresh, s1) == a
    assert not check_repository(fresh, read_data=True).issues


def test_unreadable_snapshot_is_removed_and_reported(make_repo, tmp_path: Path) -> None:
    _repo, a, _b, s1, s2 = two_snapshots(make_repo)
    flip(tmp_path / "repo" / "snapshots" / s2, 20)
    rep = repair(open_tolerant(tmp_path))
    assert rep.snapshots_removed == [s2]
    fresh = open_tolerant(tmp_path)
    assert fresh.snapshot_ids() == [s1]
    assert snapshot_files(fresh, s1) == a


def test_dry_run_changes_nothing(make_repo, tmp_path: Path) -> None:
    repo, _a, b, _s1, _s2 = two_snapshots(make_repo)
    loc = repo.index.lookup(repo.blob_id(b["b1"]))
    assert loc is not None
    flip(tmp_path / "repo" / pack_name(loc.pack_id), loc.offset + 3)
    before = {p: p.read_bytes() for p in (tmp_path / "repo").rglob("*") if p.is_file()}
    rep = repair(open_tolerant(tmp_path), dry_run=True)
    assert rep.blobs_lost == 1 and rep.packs_salvaged
    after = {p: p.read_bytes() for p in (tmp_path / "repo").rglob("*") if p.is_file()}
    assert after == before


class _LaterReadsLie(FaultyBackend):
    """A store that answers a whole read of ``name`` with the stored bytes the first time and,
    from then on, with the byte at ``at`` changed (a lying store, or damage in transit)."""

    def __init__(self, inner: LocalBackend, name: str, at: int) -> None:
        super().__init__(inner)
        self.name, self.at, self.reads = name, at, 0

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = super().get(name, offset, length)
        if name == self.name and length is None:
            self.reads += 1
            if self.reads > 1:
                changed = bytearray(data)
                changed[self.at] ^= 0x10
                return bytes(changed)
        return data


def test_salvage_stores_the_bytes_it_verified_whatever_a_later_read_answers(make_repo, tmp_path: Path) -> None:
    """repair verified each blob of a damaged pack, then read the pack again and copied the
    salvaged blobs from that second answer unchecked, before deleting the pack: a store that
    answered otherwise the second time made a good blob damaged for good."""
    repo, a, b, s1, s2 = two_snapshots(make_repo)
    victim = repo.index.lookup(repo.blob_id(a["a3"]))
    assert victim is not None
    name = pack_name(victim.pack_id)
    flip(tmp_path / "repo" / name, victim.offset + 100)
    [good, *_] = [e for e in repo.index.entries_by_pack()[victim.pack_id] if e.offset != victim.offset]
    store = _LaterReadsLie(LocalBackend(tmp_path / "repo", fsync=False), name, good.offset + 100)
    rep = repair(Repository.open(store, lambda: PASSWORD, use_cache=False, tolerant=True))
    assert rep.blobs_lost == 1 and rep.packs_salvaged == [victim.pack_id.hex()[:16]]
    fresh = open_tolerant(tmp_path)
    report = check_repository(fresh, read_data=True)
    assert report.affected == {s1: ["a3"]}, report.affected
    assert not [i for i in report.errors if i.kind in ("pack", "blob", "index")]
    assert snapshot_files(fresh, s2) == b


def test_a_pack_the_store_does_not_answer_for_is_left_as_it_was(make_repo, tmp_path: Path) -> None:
    """repair judged a pack it could not read (an error after the retries, a store down for a
    moment) as damaged and deleted it with every blob in it; now it is left and indexed as
    it was, and the report says so."""
    repo, a, b, s1, s2 = two_snapshots(make_repo)
    loc = repo.index.lookup(repo.blob_id(a["a0"]))
    assert loc is not None
    name = pack_name(loc.pack_id)
    store = FaultyBackend(LocalBackend(tmp_path / "repo", fsync=False),
                          [Fault(ops=("get",), prefix=name, action="error", message="connection reset")])
    rep = repair(Repository.open(store, lambda: PASSWORD, use_cache=False, tolerant=True))
    assert (tmp_path / "repo" / name).exists()
    fresh = open_tolerant(tmp_path)
    assert snapshot_files(fresh, s1) == a and snapshot_files(fresh, s2) == b
    assert not check_repository(fresh, read_data=True).issues
    assert rep.blobs_lost == 0 and not rep.packs_salvaged and not rep.affected
    assert [p.split(":")[0] for p in rep.packs_left] == [loc.pack_id.hex()[:16]]

