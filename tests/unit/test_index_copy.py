"""The local copy of the built index (repository/indexcache.py): used when current and
authentic, and never the cause of a wrong index (issue #18)."""

from __future__ import annotations

import os
import random
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import msgspec
import pytest

from deltavault.backends.local import LocalBackend
from deltavault.maintenance.prune import prune
from deltavault.model.types import BlobType
from deltavault.repository import indexcache, indexstore
from deltavault.repository.index import RECORD_FORMAT, Index
from deltavault.repository.indexcache import FILE_NAME, IndexCopy
from deltavault.repository.pack import PackEntry
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD
from tests.unit.test_prune_helpers import save_snapshot

Factory = Callable[..., Repository]


def count_decodes(monkeypatch: pytest.MonkeyPatch, seen: list[str]) -> None:
    """Appends to ``seen`` the name of each index file the index store decodes (whole, head
    or checked)."""
    for fn in ("check_index", "decode_index", "decode_index_head"):
        real = getattr(indexstore, fn)

        def counting(raw: bytes, name: str, _real: Callable[..., object] = real) -> object:
            seen.append(name)
            return _real(raw, name)

        monkeypatch.setattr(indexstore, fn, counting)


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    seen: list[str] = []
    count_decodes(monkeypatch, seen)
    yield seen


def open_repo(tmp_path: Path, cache_root: Path, name: str = "repo", *, build: bool = True,
              **kw: object) -> Repository:
    """Opened, and with ``build`` its index built (an open builds it only at first use)."""
    repo = Repository.open(LocalBackend(tmp_path / name, fsync=False), lambda: PASSWORD,
                           cache_root=cache_root, **kw)  # type: ignore[arg-type]
    if build:
        repo.live_index_files()
    return repo


def write_packs(repo: Repository, packs: int, per_pack: int, seed: int) -> list[tuple[bytes, list[PackEntry]]]:
    rnd = random.Random(seed)
    written = [(rnd.randbytes(32), [PackEntry(int(BlobType.DATA), rnd.randbytes(32), 100 * i, 100, 120 + i)
                                    for i in range(per_pack)]) for _ in range(packs)]
    repo.write_index_file(written)
    return written


def state(index: Index) -> tuple[int, list[bytes], list[tuple[bytes, bytes, PackEntry, int]]]:
    """Everything an index answers, in a comparable form."""
    return len(index), sorted(index.packs()), sorted(index.iter_records(), key=lambda r: r[0])


def copy_path(repo: Repository) -> Path:
    assert repo.cache_dir is not None
    return repo.cache_dir / FILE_NAME


def test_an_unchanged_repository_opens_from_the_copy_without_decoding(make_repo: Factory, tmp_path: Path,
                                                                       cache_root: Path, decoded: list[str]) -> None:
    repo = make_repo()
    write_packs(repo, 5, 300, seed=1)
    write_packs(repo, 3, 200, seed=2)
    first = open_repo(tmp_path, cache_root)  # no copy yet: loads the files and writes one
    assert not first.indexes.from_copy and len(decoded) > 0 and copy_path(first).is_file()
    decoded.clear()
    again = open_repo(tmp_path, cache_root)
    assert again.indexes.from_copy and decoded == []
    assert state(again.index) == state(first.index)
    assert again.live_index_files() == first.live_index_files() and len(again.live_index_files()) == 2
    some = next(again.index.blob_ids())
    assert again.index.lookup(some) == first.index.lookup(some)
    assert again.index.position(some) == first.index.position(some)
    # The index read back takes new packs as one built from the files does.
    again.index.add_pack(b"p" * 32, [PackEntry(int(BlobType.TREE), b"n" * 32, 0, 10, 10)])
    assert again.index.position(b"n" * 32) == len(first.index) and len(again.index) == len(first.index) + 1
    assert again.index.lookup(b"n" * 32) is not None


def copy_head(data: bytes) -> tuple[indexcache._Head, int]:
    """A copy's head and where its bucket lengths start."""
    head_len = int.from_bytes(data[12:16], "little")
    head = msgspec.msgpack.decode(data[16:16 + head_len], type=indexcache._Head)
    return head, 16 + head_len + 32 * head.packs


def damaged_copies(data: bytes) -> Iterator[tuple[str, bytes]]:
    head, lengths_at = copy_head(data)
    for at in (0, 9, 13, 20, len(data) // 3, lengths_at + 2 * head.buckets, len(data) - 100, len(data) - 1):
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        yield f"byte {at} flipped", bytes(flipped)
    rnd = random.Random(len(data))
    for at in sorted(rnd.sample(range(len(data)), 20)):
        flipped = bytearray(data)
        flipped[at] = (flipped[at] + rnd.randrange(1, 256)) % 256
        yield f"byte {at} changed", bytes(flipped)
    for keep in (0, 10, 17, len(data) // 2, len(data) - 1):
        yield f"truncated to {keep}", data[:keep]
    yield "one byte longer", data + b"\0"
    # A bucket length claiming far more than the file holds: refused before allocating it.
    yield "a huge bucket length", data[:lengths_at] + (0xFFFFFFF0).to_bytes(4, "little") + data[lengths_at + 4:]


@pytest.mark.parametrize("encrypted", [True, False])
def test_a_damaged_or_truncated_copy_is_not_used_and_is_rewritten(make_repo: Factory, tmp_path: Path,
                                                                  cache_root: Path, decoded: list[str],
                                                                  encrypted: bool) -> None:
    repo = make_repo(encrypted=encrypted)
    write_packs(repo, 4, 250, seed=3)
    good = open_repo(tmp_path, cache_root, unencrypted=not encrypted)
    want = state(good.index)
    path = copy_path(good)
    original = path.read_bytes()
    for what, data in damaged_copies(original):
        path.write_bytes(data)
        decoded.clear()
        reopened = open_repo(tmp_path, cache_root, unencrypted=not encrypted)
        assert not reopened.indexes.from_copy, what
        assert decoded, what  # loaded from the index files
        assert state(reopened.index) == want, what
        assert open_repo(tmp_path, cache_root, unencrypted=not encrypted).indexes.from_copy, what  # rewritten, good again


def test_a_copy_of_another_repository_or_version_is_not_used(make_repo: Factory, tmp_path: Path,
                                                           cache_root: Path, decoded: list[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    mine, theirs = make_repo("mine"), make_repo("theirs")
    write_packs(mine, 2, 100, seed=4)
    write_packs(theirs, 2, 100, seed=5)
    want = state(open_repo(tmp_path, cache_root, "mine").index)
    their_copy = copy_path(open_repo(tmp_path, cache_root, "theirs"))
    my_copy = copy_path(mine)
    my_copy.write_bytes(their_copy.read_bytes())
    decoded.clear()
    reopened = open_repo(tmp_path, cache_root, "mine")
    assert not reopened.indexes.from_copy and decoded and state(reopened.index) == want

    # The repository id is bound on its own too: the same key, another id, is refused.
    built = IndexCopy(my_copy.parent, mine.config.id, mine.cache_key("index"))
    assert built.read() is not None
    assert IndexCopy(my_copy.parent, theirs.config.id, mine.cache_key("index")).read() is None
    assert IndexCopy(my_copy.parent, mine.config.id, theirs.cache_key("index")).read() is None
    # Another format version is refused before anything else is read.
    monkeypatch.setattr(indexcache, "FORMAT_VERSION", indexcache.FORMAT_VERSION + 1)
    assert built.read() is None


def test_a_planted_symlink_is_not_followed(make_repo: Factory, tmp_path: Path, cache_root: Path,
                                           decoded: list[str]) -> None:
    repo = make_repo()
    write_packs(repo, 2, 50, seed=6)
    path = copy_path(open_repo(tmp_path, cache_root))
    elsewhere = tmp_path / "elsewhere"
    os.replace(path, elsewhere)
    path.symlink_to(elsewhere)
    decoded.clear()
    reopened = open_repo(tmp_path, cache_root)
    assert not reopened.indexes.from_copy and decoded


def test_an_index_file_another_client_wrote_is_added_to_the_copy(make_repo: Factory, tmp_path: Path,
                                                                 cache_root: Path, decoded: list[str]) -> None:
    repo = make_repo()
    write_packs(repo, 3, 100, seed=7)
    open_repo(tmp_path, cache_root)  # the copy
    before = set(repo.index_names())
    other = open_repo(tmp_path, tmp_path / "other-cache")  # another client, its own cache
    new = write_packs(other, 2, 50, seed=8)
    decoded.clear()
    reopened = open_repo(tmp_path, cache_root)
    assert not reopened.indexes.from_copy
    assert set(decoded) == set(repo.index_names()) - before  # only the new file is decoded
    assert all(e.id in reopened.index for _pid, entries in new for e in entries)
    assert state(reopened.index)[0] == 3 * 100 + 2 * 50
    fresh = open_repo(tmp_path, cache_root, use_cache=False)
    assert state(reopened.index)[:2] == state(fresh.index)[:2]
    decoded.clear()
    current = open_repo(tmp_path, cache_root)
    assert current.indexes.from_copy and decoded == []  # rewritten with the new file
    assert state(current.index) == state(reopened.index)


def test_a_superseded_index_never_comes_back_from_the_copy(make_repo: Factory, tmp_path: Path,
                                                           cache_root: Path) -> None:
    # A compaction as prune writes it: the new file first, the old ones deleted after.
    repo = make_repo()
    written = write_packs(repo, 4, 100, seed=9)
    written += write_packs(repo, 2, 100, seed=10)
    opened = open_repo(tmp_path, cache_root)
    stale = copy_path(opened)
    before_compaction = stale.read_bytes()
    old = sorted(opened.live_index_files())
    kept, dropped = written[:3], written[3:]
    other = open_repo(tmp_path, tmp_path / "other-cache")
    other.write_index_file(kept, supersedes=old)
    gone = [e.id for _pid, entries in dropped for e in entries]
    # Both the old files and the new one listed (the moment between the two steps) ...
    between = open_repo(tmp_path, cache_root)
    assert not any(b in between.index for b in gone) and len(between.index) == 300
    # ... and after the old files are deleted, with the copy written before the compaction.
    stale.write_bytes(before_compaction)  # the open above rewrote it: the old one back
    for name in old:
        other.backend.delete(name)
    after = open_repo(tmp_path, cache_root)
    assert not any(b in after.index for b in gone) and len(after.index) == 300
    assert open_repo(tmp_path, cache_root).indexes.from_copy


def test_a_blob_pruned_by_a_real_prune_is_absent_after_reopening(make_repo: Factory, tmp_path: Path,
                                                                 cache_root: Path) -> None:
    repo = make_repo(pack_size=1 << 20)
    old_only = {f"o{i}": os.urandom(150_000) for i in range(8)}
    keep = {f"k{i}": os.urandom(150_000) for i in range(4)}
    s1 = save_snapshot(repo, {**keep, **old_only})
    save_snapshot(repo, keep)
    stale_copy = copy_path(open_repo(tmp_path, cache_root))
    before = stale_copy.read_bytes()
    assert open_repo(tmp_path, cache_root).indexes.from_copy
    repo.delete_snapshot(s1)
    rep = prune(open_repo(tmp_path, tmp_path / "pruner-cache"))
    assert rep.packs_deleted >= 1
    stale_copy.write_bytes(before)  # the copy as it was before the prune
    reopened = open_repo(tmp_path, cache_root)
    assert not reopened.indexes.from_copy
    assert not any(reopened.has_blob(reopened.blob_id(d)) for d in old_only.values())
    assert all(reopened.has_blob(reopened.blob_id(d)) for d in keep.values())
    assert all(reopened.load_blob(reopened.blob_id(d)) == d for d in keep.values())


def test_tolerant_opens_meet_every_index_file(make_repo: Factory, tmp_path: Path, cache_root: Path,
                                              decoded: list[str]) -> None:
    repo = make_repo()
    write_packs(repo, 2, 50, seed=11)
    open_repo(tmp_path, cache_root)
    decoded.clear()
    tolerant = open_repo(tmp_path, cache_root, tolerant=True)
    assert not tolerant.indexes.from_copy and decoded


def open_traced(tmp_path: Path, cache_root: Path) -> tuple[Repository, int]:
    """The repository opened (its index built) and the peak of Python allocations meanwhile."""
    tracemalloc.start()
    try:
        opened = open_repo(tmp_path, cache_root)
        return opened, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_opening_from_the_copy_peaks_no_higher_than_loading_the_files(make_repo: Factory, tmp_path: Path,
                                                                      cache_root: Path) -> None:
    repo = make_repo()
    write_packs(repo, 200, 1000, seed=12)
    peaks = {}
    for run in ("files", "copy"):
        opened, peaks[run] = open_traced(tmp_path, cache_root)
        assert opened.indexes.from_copy == (run == "copy") and len(opened.index) == 200_000
        del opened
    assert peaks["copy"] <= peaks["files"], peaks
    # The records (57 bytes a blob), a bytearray object a bucket (8,192 of about 57 bytes
    # here, at 24 records a bucket: 2 bytes a blob) and one run of buckets read at a time (1 MiB).
    assert peaks["copy"] < 100 * 200_000, f"{peaks['copy'] / 200_000:.0f} bytes a blob"


def test_adding_a_large_new_index_file_to_the_copy_peaks_no_higher_than_loading(make_repo: Factory,
                                                                               tmp_path: Path,
                                                                               cache_root: Path) -> None:
    # A new file is read for what it supersedes, then added a pack at a time, as a load
    # adds it: never decoded whole as objects (230 bytes a blob) next to the index.
    repo = make_repo()
    write_packs(repo, 100, 1000, seed=13)
    open_repo(tmp_path, cache_root)  # the copy
    write_packs(open_repo(tmp_path, tmp_path / "other-cache"), 100, 1000, seed=14)
    peaks = {}
    for run in ("copy and new file", "files"):
        if run == "files":
            copy_path(repo).unlink()
        opened, peaks[run] = open_traced(tmp_path, cache_root)
        assert not opened.indexes.from_copy and len(opened.index) == 200_000
        del opened
    assert peaks["copy and new file"] <= peaks["files"], peaks


def test_a_planted_copy_whose_lengths_add_up_allocates_nothing_before_its_mac_fails(make_repo: Factory,
                                                                                   tmp_path: Path,
                                                                                   cache_root: Path) -> None:
    repo = make_repo()
    write_packs(repo, 2, 50, seed=15)
    path = copy_path(open_repo(tmp_path, cache_root))
    data = path.read_bytes()
    head, _lengths_at = copy_head(data)
    records = 4_000_000  # 228 MB of records claimed, a sparse file of that size
    head.blobs = records
    new_head = msgspec.msgpack.encode(head)
    lengths = bytearray(4 * head.buckets)
    lengths[:4] = (records * 57).to_bytes(4, "little")
    with open(path, "wb") as f:
        f.write(data[:12] + len(new_head).to_bytes(4, "little") + new_head + b"\1" * 32 * head.packs + lengths)
        f.truncate(f.tell() + records * 57 + 32)
    built = IndexCopy(path.parent, repo.config.id, repo.cache_key("index"))
    tracemalloc.start()
    try:
        assert built.read() is None
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    reopened = open_repo(tmp_path, cache_root)
    assert not reopened.indexes.from_copy and len(reopened.index) == 100


def remac(data: bytes, key: bytes) -> bytes:
    """``data`` with its MAC made again under ``key``: a copy as a writer with the key made it."""
    return data[:-32] + blake3.blake3(data[:-32], key=key).digest()


def v1_copy(data: bytes, index: Index) -> bytes:
    """The copy that format version 1 wrote for this state: 65,536 buckets by the id's first
    two bytes, and no bucket count in the head."""
    head, _lengths_at = copy_head(data)
    packs = index.packs()
    numbers = {p: no for no, p in enumerate(packs)}
    buckets = [bytearray() for _ in range(65536)]
    rec = struct.Struct(RECORD_FORMAT)
    for bid, pid, e, pos in index.iter_records():
        buckets[int.from_bytes(bid[:2], "big")] += rec.pack(bid, numbers[pid], e.offset, e.length,
                                                            e.raw_length, e.type, pos)
    old_head = msgspec.msgpack.encode([head.repo, head.record, head.listed, head.loaded, head.superseded,
                                       head.packs, head.blobs])
    lengths = b"".join(len(b).to_bytes(4, "little") for b in buckets)
    body = (indexcache.MAGIC + (1).to_bytes(4, "little") + len(old_head).to_bytes(4, "little") + old_head
            + b"".join(packs) + lengths + b"".join(buckets))
    return body + bytes(32)


def test_a_copy_of_the_old_format_is_rebuilt_not_an_error(make_repo: Factory, tmp_path: Path,
                                                          cache_root: Path, decoded: list[str]) -> None:
    repo = make_repo()
    write_packs(repo, 3, 400, seed=16)
    good = open_repo(tmp_path, cache_root)
    want = state(good.index)
    path = copy_path(good)
    old = remac(v1_copy(path.read_bytes(), good.index), repo.cache_key("index"))
    path.write_bytes(old)
    decoded.clear()
    reopened = open_repo(tmp_path, cache_root)
    assert not reopened.indexes.from_copy and decoded and state(reopened.index) == want
    rewritten = path.read_bytes()
    assert int.from_bytes(rewritten[8:12], "little") == indexcache.FORMAT_VERSION == 3
    assert copy_head(rewritten)[0].buckets == reopened.index.buckets
    decoded.clear()
    again = open_repo(tmp_path, cache_root)
    assert again.indexes.from_copy and decoded == [] and state(again.index) == want


@pytest.mark.parametrize("count", [0, 1, 3, 1000, 1 << 9, 1 << 29, 1 << 40, "double"])
def test_a_copy_with_a_bad_bucket_count_is_refused(make_repo: Factory, tmp_path: Path, cache_root: Path,
                                                   count: int | str) -> None:
    # Even under a MAC that verifies (a writer with the key): a bucket count that is not a
    # power of two within bounds, or not the table's, is not believed.
    repo = make_repo()
    write_packs(repo, 2, 300, seed=17)
    good = open_repo(tmp_path, cache_root)
    want = state(good.index)
    path = copy_path(good)
    data = path.read_bytes()
    head, _lengths_at = copy_head(data)
    head.buckets = 2 * head.buckets if count == "double" else int(count)
    new_head = msgspec.msgpack.encode(head)
    head_len = int.from_bytes(data[12:16], "little")
    forged = remac(data[:12] + len(new_head).to_bytes(4, "little") + new_head + data[16 + head_len:],
                   repo.cache_key("index"))
    path.write_bytes(forged)
    assert IndexCopy(path.parent, repo.config.id, repo.cache_key("index")).read() is None
    reopened = open_repo(tmp_path, cache_root)
    assert not reopened.indexes.from_copy and state(reopened.index) == want
    with pytest.raises(ValueError):
        Index.from_state([], [None] * 3, 0)
