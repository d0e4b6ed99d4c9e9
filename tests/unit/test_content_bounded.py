"""The content reader's bounds on real sparse files: a former hole, growth and an oversized
previous blob are cut by the chunker; page digests come segment by segment; extents are
found lazily."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltavault.backends.local import LocalBackend
from deltavault.backup.files.content import ContentReader
from deltavault.backup.files.delta import PrevContent
from deltavault.backup.files.pending import PendingContent
from deltavault.chunking.cdc import CdcParams, Chunker
from deltavault.chunking.pages import PAGES_PER_DIGEST_BLOB, PageHasher, segment_count
from deltavault.fs.sparse import MIN_HOLE, ReadExtents, data_extents, is_sparse
from deltavault.model.content import Full, Hole
from deltavault.model.types import BlobType
from deltavault.objects.reader import iter_content
from deltavault.repository.repository import Repository
from deltavault.workers import Inflight
from tests.conftest import FAST_SCRYPT, PASSWORD

PARAMS = CdcParams(8 * 1024, 16 * 1024, 64 * 1024, seed=7)
KEY = b"k" * 32
MiB = 1 << 20
SEG = PAGES_PER_DIGEST_BLOB * 4096  # file bytes per digest segment


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[tuple[Repository, ContentReader]]:
    repo = Repository.init(LocalBackend(tmp_path / "r", fsync=False), PASSWORD, scrypt=FAST_SCRYPT,
                           cache_root=tmp_path / "c")
    with ThreadPoolExecutor(2) as pool:
        r = ContentReader(repo, pool, Chunker(PARAMS), page_key=KEY, delta_threshold=0, inflight=Inflight(8 * MiB))
        try:
            yield repo, r
        finally:
            r.digester.close()


def _read(r: ContentReader, path: Path, prev: PrevContent | None) -> PendingContent:
    fd = os.open(path, os.O_RDONLY)
    try:
        return r.read(fd, os.fstat(fd), prev)
    finally:
        os.close(fd)


def _content(repo: Repository, refs: list) -> bytes:
    return b"".join(d if d is not None else bytes(n) for _, d, n in iter_content(repo, refs))


def _digests(repo: Repository, ids: list[bytes]) -> bytes:
    return b"".join(repo.load_blob(i) for i in ids)


def _write(path: Path, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, data, off)
    os.close(fd)


def test_a_filled_hole_is_chunked_and_digests_are_per_segment(tmp_path: Path, reader: tuple) -> None:
    repo, r = reader
    rnd = random.Random(1)
    p = tmp_path / "sparse"
    size = 3 * SEG + 12345  # four digest segments, the last one short
    with open(p, "wb") as f:
        f.truncate(size)
    _write(p, 0, rnd.randbytes(MiB))
    first = _read(r, p, None)
    refs1, pages1 = first.refs(), first.page_ids()
    assert pages1 is not None and len(pages1) == segment_count(size) == 4
    assert pages1[1] == pages1[2]  # the all-hole segments are one blob
    repo.flush()
    # Fill 5 MiB of the hole (crossing a segment boundary) and grow the file.
    _write(p, SEG - 2 * MiB, rnd.randbytes(5 * MiB))
    _write(p, size, rnd.randbytes(300_000))
    new = p.read_bytes()
    second = _read(r, p, PrevContent(refs1, pages1, size, repo.load_blob, repo.blob_id))
    refs2, pages2 = second.refs(), second.page_ids()
    repo.flush()
    assert _content(repo, refs2) == new
    assert all(x.size <= PARAMS.max_size for x in refs2 if isinstance(x, Full))
    assert any(isinstance(x, Hole) and x.size > SEG for x in refs2)  # the rest of the hole stays a hole
    assert refs2[0] == refs1[0]  # unchanged data keeps its chunks
    assert pages2 is not None and len(pages2) == segment_count(len(new))
    assert _digests(repo, pages2) == PageHasher(KEY).digests(new)
    assert second.bytes_read < 8 * MiB  # the hole was not read


def test_lost_previous_digests_and_oversized_blobs_cost_storage_not_content(tmp_path: Path, reader: tuple) -> None:
    """A previous version whose digest segment is gone, or that holds a blob larger than the
    chunker's maximum (older versions stored whole former holes as one blob), is still read
    correctly, and the oversized blob is cut again."""
    repo, r = reader
    rnd = random.Random(2)
    p = tmp_path / "f"
    old = rnd.randbytes(2 * SEG + 5000)
    p.write_bytes(old)
    first = _read(r, p, None)
    chunks, ids = first.refs(), first.page_ids()
    assert ids is not None
    # Put one blob of about 4 MiB in the middle, as an older version could have stored it.
    ends, pos = [], 0
    for c in chunks:
        pos += c.size
        ends.append(pos)
    i = next(k for k, e in enumerate(ends) if e >= SEG)
    j = next(k for k, e in enumerate(ends) if e >= SEG + 4 * MiB)
    big = old[ends[i]:ends[j]]
    bid, _ = repo.save_blob(BlobType.DATA, big)
    refs = [*chunks[:i + 1], Full(bid, len(big)), *chunks[j + 1:]]
    repo.flush()
    new = bytearray(old)
    new[100:200] = b"x" * 100
    new[SEG + MiB:SEG + MiB + 10] = b"y" * 10
    p.write_bytes(new)
    lost = {ids[0]}  # the first segment's digests are gone: its pages count as changed
    prev = PrevContent(refs, ids, len(old), lambda k: None if k in lost else repo.load_blob(k), repo.blob_id)
    second = _read(r, p, prev)
    refs2 = second.refs()
    repo.flush()
    assert _content(repo, refs2) == bytes(new)
    assert all(x.size <= PARAMS.max_size for x in refs2 if isinstance(x, Full))
    assert bid not in {x.id for x in refs2 if isinstance(x, Full)}
    assert refs2[-1] == chunks[-1]  # the unchanged tail, whose digests are known, is reused


def test_read_extents_are_lazy_page_aligned_and_swallow_short_holes(tmp_path: Path) -> None:
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.truncate(64 * MiB)
    for off in (0, 100_000, 100_000 + 4096 + MIN_HOLE // 2, 10 * MiB, 40 * MiB + 1):
        _write(p, off, b"d" * 10)
    fd = os.open(p, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        assert is_sparse(st)
        ext = ReadExtents(fd, st.st_size, True)
        got = list(ext.ranges())
        raw = data_extents(fd, st.st_size)
    finally:
        os.close(fd)
    # [0, 4096) and [98304, 102400) leave 92 KiB between them, more than MIN_HOLE: two
    # ranges; the next island is 32 KiB further, less than MIN_HOLE: merged.
    assert got[0] == (0, 4096)
    assert got[1][0] == 98304 and got[1][0] + got[1][1] >= 100_000 + 4096 + MIN_HOLE // 2 + 10
    assert (10 * MiB, 4096) in got and (40 * MiB, 4096) in got
    assert len(got) == 4 and len(raw) == 5
    assert all(o % 4096 == 0 and (n % 4096 == 0 or o + n == 64 * MiB) for o, n in got)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_delta_path_on_sparse_files_matches_the_file(tmp_path_factory: pytest.TempPathFactory,
                                                     data: st.DataObject) -> None:
    """Random sparse files, changed at random (writes into data and into holes, growth,
    truncation): the delta path stores exactly the new bytes, keeps long holes as holes,
    never stores a blob over the chunker's maximum, and its digests are the file's."""
    tmp = tmp_path_factory.mktemp("sparse-delta")
    repo = Repository.init(LocalBackend(tmp / "r", fsync=False), PASSWORD, scrypt=FAST_SCRYPT, cache_root=tmp / "c")
    rnd = random.Random(data.draw(st.integers(0, 2**32)))
    size = data.draw(st.integers(64 * 1024, 3 * MiB))
    p = tmp / "f"
    with open(p, "wb") as f:
        f.truncate(size)
    for _ in range(data.draw(st.integers(0, 5))):
        off = rnd.randrange(size)
        _write(p, off, rnd.randbytes(min(rnd.randint(1, 200_000), size - off)))
    with ThreadPoolExecutor(2) as pool:
        r = ContentReader(repo, pool, Chunker(PARAMS), page_key=KEY, delta_threshold=0, inflight=Inflight(8 * MiB))
        try:
            first = _read(r, p, None)
            refs1, ids1 = first.refs(), first.page_ids()
            assert ids1 is not None
            repo.flush()
            old_size = p.stat().st_size
            for _ in range(data.draw(st.integers(0, 6))):
                off = rnd.randrange(old_size + 100_000)
                _write(p, off, rnd.randbytes(rnd.randint(1, 100_000)))
            if data.draw(st.booleans()):
                os.truncate(p, rnd.randrange(1, p.stat().st_size + 1))
            new = p.read_bytes()
            second = _read(r, p, PrevContent(refs1, ids1, old_size, repo.load_blob, repo.blob_id))
            refs2, ids2 = second.refs(), second.page_ids()
        finally:
            r.digester.close()
    repo.flush()
    assert _content(repo, refs2) == new
    assert sum(x.size for x in refs2) == len(new)
    assert all(x.size <= PARAMS.max_size for x in refs2 if isinstance(x, Full))
    assert ids2 is not None and _digests(repo, ids2) == PageHasher(KEY).digests(new)
