from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltavault.backup.files.content import ContentReader
from deltavault.backup.files.delta import PrevContent
from deltavault.chunking.cdc import CdcParams, Chunker
from deltavault.errors import FormatError
from deltavault.model.content import Full, Hole
from deltavault.objects.patch import (
    apply_patches,
    bitmap,
    bitmap_pages,
    coalesce,
    decode_patch,
    encode_patch,
)
from deltavault.repository.repository import Repository
from deltavault.workers import Inflight

PARAMS = CdcParams(8 * 1024, 16 * 1024, 64 * 1024, seed=7)


def test_cdc_is_deterministic_and_covers_input() -> None:
    data = random.Random(1).randbytes(3 << 20)
    cuts = Chunker(PARAMS).cut(data)
    assert cuts == Chunker(PARAMS).cut(data)
    assert cuts[0][0] == 0 and sum(n for _, n in cuts) == len(data)
    assert all(n <= PARAMS.max_size for _, n in cuts)


def test_cdc_boundaries_survive_an_insertion() -> None:
    rnd = random.Random(2)
    data = rnd.randbytes(2 << 20)
    shifted = data[:1000] + b"inserted bytes" + data[1000:]
    a = {data[o:o + n] for o, n in Chunker(PARAMS).cut(data)}
    b = {shifted[o:o + n] for o, n in Chunker(PARAMS).cut(shifted)}
    assert len(a & b) >= len(a) - 2  # only the chunk around the insertion differs


def test_seed_changes_boundaries() -> None:
    data = random.Random(3).randbytes(1 << 20)
    other = CdcParams(PARAMS.min_size, PARAMS.avg_size, PARAMS.max_size, seed=99)
    assert Chunker(PARAMS).cut(data) != Chunker(other).cut(data)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 200_000, 3 * (1 << 20) + 17])
def test_streamed_file_chunks_equal_whole_buffer_chunks(tmp_path: Path, repo: Repository, size: int) -> None:
    """The zero-copy window reader must cut exactly where a whole-buffer cut would."""
    data = random.Random(size).randbytes(size)
    p = tmp_path / "f"
    p.write_bytes(data)
    chunker = Chunker(PARAMS)
    with ThreadPoolExecutor(2) as pool:
        reader = ContentReader(repo, pool, chunker, page_key=b"k" * 32, delta_threshold=1 << 40,
                               inflight=Inflight(1 << 26))
        reader.window = 256 * 1024  # many windows, so carry-over is exercised
        fd = os.open(p, os.O_RDONLY)
        try:
            pending = reader._read_stream(fd, size, [(0, size)] if size else [])
        finally:
            os.close(fd)
        refs = pending.refs()
    repo.flush()
    want = [n for _, n in chunker.cut(data)] if size else []
    assert [r.size for r in refs] == want
    assert all(isinstance(r, Full) for r in refs)
    assert b"".join(repo.load_blob(r.id) for r in refs if isinstance(r, Full)) == data


def test_patch_roundtrip_and_validation() -> None:
    base = bytes(range(256)) * 64
    pieces = [(0, b"A" * 10), (4096, b"B" * 4096), (16000, b"C" * 384)]
    blob = encode_patch(pieces)
    out = apply_patches(base, [blob], len(base))
    assert out[:10] == b"A" * 10 and out[4096:8192] == b"B" * 4096 and out[16000:] == b"C" * 384
    assert out[10:4096] == base[10:4096]
    with pytest.raises(FormatError):
        decode_patch(encode_patch([(16000, b"x" * 1000)]), len(base))  # out of bounds
    with pytest.raises(FormatError):
        decode_patch(encode_patch([(100, b"x"), (50, b"y")]), len(base))  # out of order
    with pytest.raises(FormatError):
        decode_patch(blob[:-1], len(base))
    with pytest.raises(FormatError):
        apply_patches(base[:-1], [blob], len(base))


def test_coalesce_clips_to_region() -> None:
    # region [6000, 20000) touches pages 1..4 (4 KiB pages)
    assert coalesce([1, 2, 4], 6000, 14000, 4096) == [(0, 6288), (10384, 3616)]


@given(st.lists(st.integers(0, 500), unique=True))
def test_bitmap_roundtrip(pages: list[int]) -> None:
    first = 1000
    absolute = [first + p for p in pages]
    assert bitmap_pages(bitmap(absolute, first, 501), first) == set(absolute)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_delta_path_reconstructs_in_place_changes(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """A large file changed in place is stored as patches; reading the patches back gives
    the new content exactly, and only changed pages are stored."""
    tmp = tmp_path_factory.mktemp("delta")
    from deltavault.backends.local import LocalBackend
    from tests.conftest import FAST_SCRYPT, PASSWORD

    repo = Repository.init(LocalBackend(tmp / "r", fsync=False), PASSWORD, scrypt=FAST_SCRYPT, cache_root=tmp / "c")
    rnd = random.Random(data.draw(st.integers(0, 2**32)))
    size = data.draw(st.integers(64 * 1024, 600 * 1024))
    old = bytearray(rnd.randbytes(size))
    p = tmp / "big"
    p.write_bytes(old)
    chunker = Chunker(PARAMS)
    with ThreadPoolExecutor(2) as pool:
        reader = ContentReader(repo, pool, chunker, page_key=b"k" * 32, delta_threshold=0, inflight=Inflight(1 << 26))
        fd = os.open(p, os.O_RDONLY)
        first = reader.read(fd, os.fstat(fd), None)
        os.close(fd)
        refs1, pages1 = first.refs(), first.page_ids()
        assert pages1 is not None
        repo.flush()
        new = bytearray(old)
        writes = data.draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 3000)), max_size=12))
        for off, ln in writes:
            new[off:off + ln] = rnd.randbytes(min(ln, size - off))
        grow = data.draw(st.sampled_from([0, 0, 5000, -3000]))
        if grow > 0:
            new += rnd.randbytes(grow)
        elif grow < 0:
            del new[grow:]
        p.write_bytes(new)
        fd = os.open(p, os.O_RDONLY)
        second = reader.read(fd, os.fstat(fd), PrevContent(refs1, pages1, len(old), repo.load_blob, repo.blob_id))
        os.close(fd)
        refs2 = second.refs()
        reader.digester.close()
    repo.flush()
    from deltavault.objects.reader import iter_content

    out = b"".join(d if d is not None else bytes(n) for _, d, n in iter_content(repo, refs2))
    assert out == bytes(new)
    if not writes and grow == 0:
        assert refs2 == refs1
    assert not any(isinstance(r, Hole) for r in refs2)
