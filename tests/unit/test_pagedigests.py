from __future__ import annotations

import os
import random
from pathlib import Path

from deltavault.backup.pagedigests import PageDigester
from deltavault.chunking.pages import PageHasher

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
        fut = d.submit(os.fsencode(p), os.stat(p))
        got = fut.result(timeout=60)
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
        assert d.submit(os.fsencode(p), st).result(timeout=60) is None
    finally:
        d.close()
