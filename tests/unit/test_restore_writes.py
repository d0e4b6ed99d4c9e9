"""A restore writes file data in pieces of at most WRITE_PIECE (restore/content.py: large
buffered writes made the kernel fill large page-cache folios, which cost many times the
system time on the benchmark VM), and the bytes come out whole, in place, holes kept."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deltavault.fs.clone import pwrite_all
from deltavault.model.content import ContentRef, Full, Hole
from deltavault.model.nodes import Node, NodeType
from deltavault.restore import content
from deltavault.restore.content import WRITE_PIECE, write_content


class _NoRepo:
    """Every blob is preloaded: the repository must not be asked for one."""

    def prefetch_blobs(self, ids: list[bytes]) -> None:
        assert not ids

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"repository asked for {name}")


@pytest.fixture
def pwrites(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    real = os.pwrite

    def recording(fd: int, data: bytes | memoryview, off: int) -> int:
        sizes.append(len(data))
        return real(fd, data, off)

    monkeypatch.setattr(os, "pwrite", recording)
    return sizes


@pytest.mark.parametrize("piece", [0, 1000, 4096])
def test_pwrite_all_writes_everything_in_pieces(tmp_path: Path, pwrites: list[int], piece: int) -> None:
    data = os.urandom(3 * 4096 + 17)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pwrite_all(fd, data, 5, piece)
        assert os.pread(fd, len(data) + 10, 0) == bytes(5) + data
    finally:
        os.close(fd)
    assert sum(pwrites) == len(data)
    assert max(pwrites) == (piece or len(data))


def test_a_restored_file_is_written_in_small_pieces(tmp_path: Path, pwrites: list[int]) -> None:
    blobs = [os.urandom(3 * WRITE_PIECE + 5), os.urandom(WRITE_PIECE // 3)]
    refs: list[ContentRef] = [Full(id=b"a" * 32, size=len(blobs[0])), Hole(size=1 << 20),
                              Full(id=b"b" * 32, size=len(blobs[1]))]
    size = sum(r.size for r in refs)
    node = Node(name=b"f", type=NodeType.FILE, size=size, content=refs)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        expect = write_content(_NoRepo(), fd, node, {b"a" * 32: blobs[0], b"b" * 32: blobs[1]},  # type: ignore[arg-type]
                               digests=False, fresh=True)
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, size, 0) == blobs[0] + bytes(1 << 20) + blobs[1]
    finally:
        os.close(fd)
    assert max(pwrites) <= WRITE_PIECE
    assert sum(pwrites) == len(blobs[0]) + len(blobs[1])  # the hole is not written
    assert [e[2] for e in expect] == [b"a" * 32, None, b"b" * 32]


def test_a_segment_starts_as_soon_as_any_one_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first segment is held until the third is written: with two in flight, the third
    can only start if the second's end makes room (waiting for the oldest would hang)."""
    seg = content.SEGMENT_BYTES
    blobs = {bytes([i]) * 32: os.urandom(seg) for i in range(3)}
    refs: list[ContentRef] = [Full(id=k, size=seg) for k in blobs]
    node = Node(name=b"f", type=NodeType.FILE, size=3 * seg, content=refs)
    third_written = threading.Event()
    real = content._write_batch

    def held(repo: object, fd: int, batch: list[tuple[int, ContentRef]], *rest: object) -> object:
        if batch[0][0] == 0 and not third_written.wait(timeout=60):
            raise AssertionError("the third segment never started while the first was held")
        out = real(repo, fd, batch, *rest)  # type: ignore[arg-type]
        if batch[0][0] == 2 * seg:
            third_written.set()
        return out

    monkeypatch.setattr(content, "_write_batch", held)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with ThreadPoolExecutor(2) as pool:
            expect = write_content(_NoRepo(), fd, node, blobs, digests=False,  # type: ignore[arg-type]
                                   pool=pool, window=2, fresh=True)
        assert os.pread(fd, 3 * seg, 0) == b"".join(blobs.values())
    finally:
        os.close(fd)
    assert [(off, digest) for off, _n, digest in expect] == [(i * seg, k) for i, k in enumerate(blobs)]


def test_large_files_of_a_directory_are_started_first() -> None:
    from deltavault.restore.files import _large_first
    from deltavault.restore.regular import INLINE_BELOW

    def f(name: bytes, size: int, links: int = 1, kind: NodeType = NodeType.FILE) -> Node:
        return Node(name=name, type=kind, size=size, links=links)

    nodes = [f(b"a", 10), f(b"d", 0, kind=NodeType.DIR), f(b"big1", INLINE_BELOW), f(b"b", 5),
             f(b"linked", 10 * INLINE_BELOW, links=2), f(b"big2", 50 * INLINE_BELOW)]
    assert [n.name for n in _large_first(nodes)] == [b"big1", b"big2", b"a", b"d", b"b", b"linked"]
    small = nodes[:2]
    assert _large_first(small) is small
