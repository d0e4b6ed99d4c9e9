from __future__ import annotations

import os
import random
from concurrent.futures import Future
from pathlib import Path

import pytest

from deltavault.backup.files.content import PendingContent
from deltavault.backup.files.pagedigests import MAX_PENDING, PageDigester
from deltavault.chunking.pages import (
    PAGES_PER_DIGEST_BLOB,
    SEGMENT_BYTES,
    DigestSegments,
    PageHasher,
)
from deltavault.fs.sparse import is_sparse

KEY = b"k" * 32


def _expected(data: bytes, size: int) -> bytes:
    return PageHasher(KEY).digests(data.ljust(size, b"\0"))


class _Segments:
    """A sink that keeps what it is given, for comparing."""

    def __init__(self) -> None:
        self.got: dict[bytes, bytes] = {}
        self.zero = PageHasher(KEY).zero * PAGES_PER_DIGEST_BLOB

    def __call__(self, data: bytes | None) -> bytes:
        raw = self.zero if data is None else data
        bid = os.urandom(8) + len(self.got).to_bytes(4, "little")
        self.got[bid] = raw
        return bid

    def joined(self, ids: list[bytes]) -> bytes:
        return b"".join(self.got[i] for i in ids)


def _digest_file(d: PageDigester, p: Path, sink: _Segments) -> tuple[list[bytes], bytes] | None:
    fd = os.open(p, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        fut = d.submit(fd, st, is_sparse(st), sink)
    finally:
        os.close(fd)  # the helper holds its own reference to the open file
    return fut.result(timeout=120)


def test_helper_process_digests_match_in_process(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = random.Random(1).randbytes(3 * 4096 + 100)
    p.write_bytes(data)
    with open(p, "r+b") as f:  # a hole in the middle, data at the end
        f.seek(10 << 20)
        f.write(b"tail")
    d = PageDigester(KEY)
    sink = _Segments()
    try:
        res = _digest_file(d, p, sink)
        assert res is not None
        assert d._proc is not None and not d._broken  # it really ran in the helper
    finally:
        d.close()
    want = _expected(p.read_bytes(), os.stat(p).st_size)
    assert sink.joined(res[0]) == want


def test_helper_reads_the_descriptor_not_the_name(tmp_path: Path) -> None:
    """The helper gets the file we opened: renaming another file over its name (or a
    path too long to resolve) changes nothing."""
    p = tmp_path / "f"
    data = random.Random(2).randbytes(50_000)
    p.write_bytes(data)
    d = PageDigester(KEY)
    sink = _Segments()
    try:
        fd = os.open(p, os.O_RDONLY)
        other = tmp_path / "other"
        other.write_bytes(b"x" * 50_000)
        os.rename(other, p)  # the name now names another file
        fut = d.submit(fd, os.fstat(fd), False, sink)
        os.close(fd)
        res = fut.result(timeout=60)
    finally:
        d.close()
    assert res is not None and sink.joined(res[0]) == _expected(data, len(data))


def test_a_file_that_is_not_the_one_read_gets_no_digests(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"a" * 10000)
    fd = os.open(p, os.O_RDWR)
    st = os.fstat(fd)
    os.pwrite(fd, b"b" * 20000, 0)  # size (and ctime) moved on: the helper must refuse
    d = PageDigester(KEY)
    try:
        assert d.submit(fd, st, False, _Segments()).result(timeout=60) is None
    finally:
        os.close(fd)
        d.close()


def test_many_requests_are_bounded_and_all_answered(tmp_path: Path) -> None:
    d = PageDigester(KEY)
    sink = _Segments()
    futs = []
    try:
        for i in range(3 * MAX_PENDING):
            p = tmp_path / f"f{i}"
            p.write_bytes(bytes([i]) * (4096 * 3 + i))
            fd = os.open(p, os.O_RDONLY)
            futs.append((p, d.submit(fd, os.fstat(fd), False, sink)))
            os.close(fd)
        for p, fut in futs:
            res = fut.result(timeout=60)
            assert res is not None
            assert sink.joined(res[0]) == _expected(p.read_bytes(), p.stat().st_size)
    finally:
        d.close()


def test_segments_cut_at_64_mib_and_hole_runs_come_whole() -> None:
    h = PageHasher(KEY)
    got: list[bytes | None] = []
    seg = DigestSegments(h, got.append)
    seg.add(h.digests(b"x" * 4096 * 3))
    seg.add_zeros(3 * PAGES_PER_DIGEST_BLOB * 4096)  # fills the first, then two whole hole segments...
    seg.add_zeros(100 * 4096 + 17)  # ...and the file's short last page
    seg.finish()
    assert [None if g is None else len(g) for g in got] == [SEGMENT_BYTES, None, None, (3 + 100 + 1) * 16]
    assert got[0] == h.digests(b"x" * 4096 * 3) + h.zero * (PAGES_PER_DIGEST_BLOB - 3)
    assert got[3] == h.zero * 103 + h.digest(bytes(17))
    assert seg.pages == 3 * PAGES_PER_DIGEST_BLOB + 3 + 101


def test_digests_from_another_read_than_ours_are_dropped() -> None:
    fut: Future = Future()
    fut.set_result(([b"i" * 32], b"helper's content hash"))
    assert PendingContent(pages=fut, content_hash=b"our content hash").page_ids() is None
    same: Future = Future()
    same.set_result(([b"i" * 32], b"h"))
    assert PendingContent(pages=same, content_hash=b"h").page_ids() == [b"i" * 32]


def test_answers_that_do_not_parse_end_the_helper_and_no_file_waits(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Something else writes to the helper's stdout (here a site hook, as a library might):
    the reader thread died on the answer it could not parse, and every file waiting for
    digests waited forever. Now the helper is ended, the waiting file gets no digests and
    the next one is digested in this process."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos.write(1, b'hello from a site hook\\n')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    p = tmp_path / "f"
    data = random.Random(2).randbytes(5 * 4096)
    p.write_bytes(data)
    d = PageDigester(KEY)
    sink = _Segments()
    try:
        assert _digest_file(d, p, sink) is None  # before: no answer, ever
        assert d._broken
        res = _digest_file(d, p, sink)
        assert res is not None and sink.joined(res[0]) == _expected(data, len(data))
    finally:
        d.close()
