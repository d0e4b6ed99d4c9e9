"""The in-memory index's table grows with it (repository/index.py; issue #18): every blob
stays found across growths, duplicates stay single, lookups that race a growth (they take no
lock) never miss a blob added before them, and a load sizes the table once, up front."""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from itertools import pairwise, zip_longest
from pathlib import Path

import pytest

from deltavault.backends.local import LocalBackend
from deltavault.model.types import BlobType
from deltavault.repository import index as index_mod
from deltavault.repository.index import BlobLocation, Index, bits_for, valid_bucket_count
from deltavault.repository.indexfile import IndexFile, IndexPack, decode_index_head, encode_index
from deltavault.repository.pack import PackEntry
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD

Factory = Callable[..., Repository]


@pytest.fixture
def small_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 buckets to start, sized for 1 record a bucket and grown past 2: a few thousand
    records cross several growths (x4 or x8 each)."""
    monkeypatch.setattr(index_mod, "MIN_BITS", 4)
    monkeypatch.setattr(index_mod, "SIZE_AT", 1)
    monkeypatch.setattr(index_mod, "GROW_AT", 2)


def packs_of(rnd: random.Random, count: int, per_pack: int) -> list[tuple[bytes, list[PackEntry]]]:
    return [(rnd.randbytes(32), [PackEntry(int(BlobType.DATA), rnd.randbytes(32), 100 * i, 100 + i, 90 + i)
                                 for i in range(per_pack)]) for _ in range(count)]


def expected(packs: list[tuple[bytes, list[PackEntry]]]) -> dict[bytes, tuple[BlobLocation, int]]:
    """What the index must answer for each blob: its first copy, numbered in adding order."""
    out: dict[bytes, tuple[BlobLocation, int]] = {}
    for pid, entries in packs:
        for e in entries:
            if e.id not in out:
                out[e.id] = (BlobLocation(pid, e.offset, e.length, BlobType(e.type)), len(out))
    return out


def assert_answers(idx: Index, want: dict[bytes, tuple[BlobLocation, int]]) -> None:
    assert len(idx) == len(want)
    for bid, (loc, pos) in want.items():
        assert idx.lookup(bid) == loc and idx.position(bid) == pos
    assert sorted(r[0] for r in idx.iter_records()) == sorted(want)
    assert sorted(r[3] for r in idx.iter_records()) == list(range(len(want)))


def test_the_table_grows_and_every_blob_stays_found(small_table: None) -> None:
    rnd = random.Random(1)
    idx = Index()
    assert idx.buckets == 16
    packs = packs_of(rnd, 60, 97)
    sizes = [idx.buckets]
    for n, (pid, entries) in enumerate(packs, 1):
        idx.add_pack(pid, entries)
        if idx.buckets != sizes[-1]:
            sizes.append(idx.buckets)
        assert len(idx) <= 2 * idx.buckets  # never more than GROW_AT records a bucket
        if n % 15 == 0:
            assert_answers(idx, expected(packs[:n]))
    assert len(sizes) >= 4, sizes  # several growths, each to a larger power of two
    assert all(valid_bucket_count(s) and s > prev for prev, s in pairwise(sizes)), sizes
    assert_answers(idx, expected(packs))
    assert not any(rnd.randbytes(32) in idx for _ in range(1000))
    assert idx.lookup(b"short") is None and idx.position(b"") is None


def test_a_duplicate_added_across_a_growth_stays_single(small_table: None) -> None:
    rnd = random.Random(2)
    first = packs_of(rnd, 3, 10)  # 30 records in 16 buckets: the next add grows
    idx = Index()
    for pid, entries in first:
        idx.add_pack(pid, entries)
    before = idx.buckets
    # One pack mixing copies of every blob already there (in another pack), new blobs and
    # repeats of those new blobs within the pack, growing the table midway.
    old = [PackEntry(e.type, e.id, 7, 8, 9) for _pid, entries in first for e in entries]
    new = packs_of(rnd, 1, 200)[0][1]
    mixed = [x for pair in zip_longest(old + old, new) for x in pair if x is not None] + new[:50] + old
    idx.add_pack(b"m" * 32, mixed)
    assert idx.buckets > before
    want = expected([*first, (b"m" * 32, mixed)])
    assert len(want) == 230
    assert_answers(idx, want)
    # Adding everything again, in another pack, after more growth: nothing changes.
    idx.add_pack(b"a" * 32, packs_of(rnd, 1, 300)[0][1])
    grown = idx.buckets
    for pid, entries in [*first, (b"m" * 32, mixed)]:
        idx.add_pack(b"z" * 32, entries)
        idx.add_pack(pid, entries)
    assert idx.buckets == grown and len(idx) == 530
    for bid, (loc, pos) in want.items():
        assert idx.lookup(bid) == loc and idx.position(bid) == pos


def test_reserve_sizes_the_table_once_ahead_of_the_adds(small_table: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    grows: list[int] = []
    real = Index._grow

    def counted(self: Index, bits: int) -> None:
        grows.append(bits)
        real(self, bits)

    monkeypatch.setattr(Index, "_grow", counted)
    rnd = random.Random(3)
    packs = packs_of(rnd, 20, 100)
    idx = Index()
    idx.reserve(2000)
    assert idx.buckets == 1 << bits_for(2000, 1) == 2048 and len(grows) == 1
    for pid, entries in packs:
        idx.add_pack(pid, entries)
    assert len(grows) == 1  # no growth while adding what was reserved
    assert Index(expected=2000).buckets == 2048
    # Reserving more for a table that holds records moves them into the larger one.
    idx.reserve(10_000)
    assert idx.buckets == 16384 and len(grows) == 2
    assert_answers(idx, expected(packs))
    idx.reserve(10)  # never shrinks
    assert idx.buckets == 16384 and len(grows) == 2


def test_an_interrupted_growth_leaves_every_record_in_the_old_table(small_table: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(4)
    packs = packs_of(rnd, 4, 8)  # 32 records: the 33rd grows the table
    idx = Index()
    for pid, entries in packs:
        idx.add_pack(pid, entries)
    calls = 0
    real_from_bytes = int.from_bytes

    class Interrupting(int):
        @classmethod
        def from_bytes(cls, *a: object, **k: object) -> int:  # type: ignore[override]
            nonlocal calls
            calls += 1
            if calls == 20:  # midway through moving the records
                raise KeyboardInterrupt
            return real_from_bytes(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(index_mod, "int", Interrupting, raising=False)
    with pytest.raises(KeyboardInterrupt):
        idx.reserve(1000)
    monkeypatch.undo()
    assert idx.buckets == 16 and idx._gen % 2 == 0
    assert_answers(idx, expected(packs))
    more = packs_of(rnd, 2, 50)
    for pid, entries in more:
        idx.add_pack(pid, entries)
    assert idx.buckets > 16
    assert_answers(idx, expected(packs + more))


@pytest.fixture
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave inside growths, not only between them
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def test_lookups_racing_growths_never_miss_a_blob_added_before_them(small_table: None, fast_switching: None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(5)
    packs = packs_of(rnd, 150, 200)  # 30,000 blobs: growths at 32, 128, 512, ..., 8,192 records
    absent = [rnd.randbytes(32) for _ in range(500)]
    want = expected(packs)
    ids = list(want)
    idx = Index()
    done = 0  # blobs added: ids[:done] are in the index (set after each add_pack returns)
    stop = threading.Event()
    failures: list[str] = []
    lookups = [0, 0]  # lookups made, and of those begun while a growth ran

    def reader(seed: int) -> None:
        r = random.Random(seed)
        while not stop.is_set():
            upto = done
            if upto == 0:
                continue
            for bid in (ids[r.randrange(upto)] for _ in range(200)):
                lookups[1] += idx._gen & 1
                loc, pos = want[bid]
                if idx.lookup(bid) != loc or idx.position(bid) != pos or bid not in idx:
                    failures.append(f"{bid.hex()} (added, {upto} in) not found")
            if r.choice(absent) in idx:
                failures.append("a blob never added was found")
            lookups[0] += 202

    # The adding thread lets the readers run at every record a growth moves, so lookups meet
    # tables half moved (a growth alone is over in a few switch intervals).
    writer, real_from_bytes = threading.get_ident(), int.from_bytes

    class Yielding(int):
        @classmethod
        def from_bytes(cls, *a: object, **k: object) -> int:  # type: ignore[override]
            if idx._gen & 1 and threading.get_ident() == writer:
                time.sleep(0)
            return real_from_bytes(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(index_mod, "int", Yielding, raising=False)
    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    grown = set()
    try:
        for pid, entries in packs:
            idx.add_pack(pid, entries)
            done += len(entries)
            grown.add(idx.buckets)
            seen = lookups[0]
            while lookups[0] == seen and not failures:  # the readers get turns between adds too
                time.sleep(0.0001)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [], failures[:5]
    assert len(grown) >= 4 and lookups[0] >= len(packs) and lookups[1] > 0, (grown, lookups)
    assert_answers(idx, want)


def test_an_index_files_head_counts_its_entries_without_decoding_them() -> None:
    rnd = random.Random(6)
    # Packs of 0, 15, 16 and 70,000 entries: msgpack's three array headers (fix, 16, 32 bit).
    packs = [IndexPack(rnd.randbytes(32), entries) for _pid, entries in
             (packs_of(rnd, 1, k)[0] for k in (0, 15, 16, 70_000))]
    sup = [rnd.randbytes(32)]
    raw = encode_index(IndexFile(packs=packs, supersedes=sup))
    assert decode_index_head(raw, "index/x") == (sup, 70_031, [])
    assert decode_index_head(encode_index(IndexFile(packs=[])), "index/y") == ([], 0, [])


def test_a_load_sizes_the_table_once_and_never_grows_it(make_repo: Factory, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "SIZE_AT", 4)
    repo = make_repo()
    rnd = random.Random(7)
    for _ in range(3):  # three index files of 1,998 blobs: 2,048 buckets at 4 a bucket
        repo.write_index_file(packs_of(rnd, 6, 333))
    grows: list[int] = []
    real = Index._grow
    monkeypatch.setattr(Index, "_grow", lambda self, bits: (grows.append(bits), real(self, bits))[1])
    opened = Repository.open(LocalBackend(tmp_path / "repo", fsync=False), lambda: PASSWORD, use_cache=False)
    assert len(opened.index) == 3 * 6 * 333
    assert grows == [bits_for(len(opened.index), 4)]  # once, by the reserve, before any add
    assert opened.index.buckets == 1 << grows[0] and len(opened.index) <= 4 * opened.index.buckets
