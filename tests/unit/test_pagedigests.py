from __future__ import annotations

import os
import random
from pathlib import Path

from deltavault.backup.pagedigests import PageDigester
from deltavault.chunking.pages import PageHasher
from deltavault.fs.sparse import read_extents

KEY = b"k" * 32


def _expected(data: bytes, size: int) -> bytes:
    return PageHasher(KEY).digests(data.ljust(size, b"\0"))


def test_helper_process_digests_match_in_process(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = random.Random(1).randbytes(3 * 4096 + 100)
    p.write_bytes(data)
    with open(p, "r+b") as f:  # a hole in the middle, data at the end
        f.seek(10 << 20)
        f.write(b"tail")
    d = PageDigester(KEY)
    try:
        fd = os.open(p, os.O_RDONLY)
        extents = read_extents(fd, os.fstat(fd))
        os.close(fd)
        res = d.submit(os.fsencode(p), os.stat(p), extents).result(timeout=60)
        assert res is not None
        got, _content = res
        assert d._proc is not None and not d._broken  # it really ran in the helper
    finally:
        d.close()
    want = _expected(p.read_bytes(), os.stat(p).st_size)
    assert got == want


def test_a_file_that_is_not_the_one_read_gets_no_digests(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"a" * 10000)
    st = os.stat(p)
    p.write_bytes(b"b" * 20000)  # size (and ctime) moved on: the helper must refuse
    d = PageDigester(KEY)
    try:
        assert d.submit(os.fsencode(p), st, [(0, 12288)]).result(timeout=60) is None
    finally:
        d.close()


def test_digests_from_another_read_than_ours_are_dropped() -> None:
    from concurrent.futures import Future

    from deltavault.backup.content import PendingContent

    fut: Future = Future()
    fut.set_result((b"d" * 32, b"helper's content hash"))
    assert PendingContent(digests=fut, content_hash=b"our content hash").digest_bytes() is None
    same: Future = Future()
    same.set_result((b"d" * 32, b"h"))
    assert PendingContent(digests=same, content_hash=b"h").digest_bytes() == b"d" * 32
