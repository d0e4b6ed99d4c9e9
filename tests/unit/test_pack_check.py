"""A backup's listing of the packs (repository/packcheck.py): blobs of a pack gone from the
repository, or beyond the end of one cut short, count as absent and are stored again; the
index files written then name the pack as gone, so later loads (from the files or through
the local copy of the index) find the new copies; a gone mark never loses a blob that has
no other copy."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from deltavault.backends.local import LocalBackend
from deltavault.model.types import BlobType
from deltavault.repository.index import Index
from deltavault.repository.pack import PackEntry, pack_name
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD

Factory = Callable[..., Repository]


def _stored(repo: Repository, count: int, size: int) -> tuple[list[bytes], list[bytes], bytes]:
    """``count`` random blobs of ``size`` bytes saved and flushed (one pack): (blobs, ids, pack)."""
    blobs = [os.urandom(size) for _ in range(count)]
    ids = [repo.save_blob(BlobType.DATA, b)[0] for b in blobs]
    repo.flush()
    return blobs, ids, _pack_of(repo, ids[0])


def _pack_of(repo: Repository, bid: bytes) -> bytes:
    loc = repo.index.lookup(bid)
    assert loc is not None
    return loc.pack_id


def test_blobs_of_a_missing_pack_are_stored_again_and_found_there_later(make_repo: Factory,
                                                                        tmp_path: Path) -> None:
    repo = make_repo()
    blobs, ids, gone = _stored(repo, 20, 5000)
    repo.backend.delete(pack_name(gone))

    again = make_repo(reopen=True)
    found = again.check_packs()
    assert found.missing == [gone] and found.dropped == 20 and found.listed == 0
    assert not any(again.has_blob(b) for b in ids)
    assert [again.save_blob(BlobType.DATA, b)[1] > 0 for b in blobs] == [True] * 20
    again.flush()
    assert not again.save_index_copy()  # its index is not what the files say: no copy from it

    # New processes, through the local copy of the index and from the files alone.
    for later in (make_repo(reopen=True),
                  Repository.open(LocalBackend(tmp_path / "repo"), lambda: PASSWORD, use_cache=False)):
        assert all(_pack_of(later, b) != gone for b in ids)
        assert [later.load_blob(b) for b in ids] == blobs
        assert later.check_packs().dropped == 0  # nothing left in the missing pack


def test_blobs_beyond_the_end_of_a_truncated_pack_are_stored_again(make_repo: Factory) -> None:
    repo = make_repo()
    blobs, ids, pid = _stored(repo, 10, 5000)
    locs = [repo.index.lookup(b) for b in ids]
    cut = sorted(loc.offset + loc.length for loc in locs if loc is not None)[4]  # five blobs survive whole
    path = Path(repo.backend.location()) / pack_name(pid)
    os.truncate(path, cut)

    again = make_repo(reopen=True)
    found = again.check_packs()
    assert found.truncated == [pid] and found.dropped == 5
    kept = [b for b in ids if again.has_blob(b)]
    assert len(kept) == 5 and all(_pack_of(again, b) == pid for b in kept)
    for b in blobs:
        again.save_blob(BlobType.DATA, b)
    again.flush()
    later = make_repo(reopen=True)
    assert [later.load_blob(b) for b in ids] == blobs
    assert later.check_packs().dropped == 0


def test_a_gone_mark_loses_no_blob_that_has_no_other_copy(make_repo: Factory) -> None:
    # A listing that lied (a pack hidden for a moment): the index files then name a pack
    # as gone that is there. Its blobs stay in the index; only copies elsewhere win.
    repo = make_repo()
    blobs, ids, pid = _stored(repo, 5, 3000)
    repo.indexes.gone.add(pid)
    extra = repo.save_blob(BlobType.DATA, os.urandom(3000))[0]
    repo.flush()
    later = make_repo(reopen=True)
    assert all(_pack_of(later, b) == pid for b in ids) and later.has_blob(extra)
    assert [later.load_blob(b) for b in ids] == blobs


def test_drop_keeps_positions_and_the_other_records() -> None:
    idx = Index()
    a, b = os.urandom(32), os.urandom(32)
    ea = [PackEntry(BlobType.DATA, os.urandom(32), i * 100, 100, 100) for i in range(50)]
    eb = [PackEntry(BlobType.DATA, os.urandom(32), i * 100, 100, 100) for i in range(50)]
    idx.add_pack(a, ea)
    idx.add_pack(b, eb)
    before = {e.id: idx.position(e.id) for e in eb}
    assert idx.pack_ends() == {a: 5000, b: 5000}
    assert idx.drop({a: 0, b: 2500}) == 75
    assert not any(e.id in idx for e in ea)
    assert [e.id in idx for e in eb] == [True] * 25 + [False] * 25
    assert all(idx.position(e.id) == before[e.id] for e in eb[:25])
    assert idx.pack_ends() == {a: 0, b: 2500}


def test_drop_of_many_packs_at_once() -> None:
    # More packs than are searched for one by one: every record is looked at instead.
    idx = Index()
    packs = [os.urandom(32) for _ in range(12)]
    entries = {p: [PackEntry(BlobType.DATA, os.urandom(32), i * 10, 10, 10) for i in range(30)] for p in packs}
    for p in packs:
        idx.add_pack(p, entries[p])
    assert idx.drop({p: 0 for p in packs[:10]}) == 300
    assert [sum(e.id in idx for e in entries[p]) for p in packs] == [0] * 10 + [30, 30]
