"""A directory whose listing is larger than the largest blob a reader decompresses
(envelope.MAX_BLOB, 256 MiB): a million long names, or here 66,000 symlinks with 4 KiB
targets. Its tree blob was stored compressed, and the backup succeeded; every later read
refused the frame ("declares N bytes, over the limit"): a snapshot that could never be
restored. Nothing over the limit is compressed now, so it restores, lists and checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deltavault.repository.envelope import MAX_BLOB, Envelope
from deltavault.repository.keys import MasterKey
from tests.conftest import Cli

TARGET = 4000
COUNT = MAX_BLOB // TARGET + 1000  # the tree's entries add their own fields on top


@pytest.mark.parametrize("key", [None, MasterKey.generate()], ids=["plain", "encrypted"])
def test_whatever_is_sealed_opens_again_above_the_limit_too(key: MasterKey | None) -> None:
    env = Envelope(key)
    for data in (b"\0" * MAX_BLOB, b"\0" * (MAX_BLOB + 1)):
        sealed = env.seal(data, aad=b"blob")
        assert len(sealed) < 1 << 20 if len(data) <= MAX_BLOB else len(sealed) > MAX_BLOB
        assert env.open(sealed, aad=b"blob") == data
        del sealed
    head, body = env.seal_many([b"\0" * (MAX_BLOB + 1), b"\0" * 100], aad=b"blob")[0]
    assert env.open(bytes(head) + bytes(body), aad=b"blob") == b"\0" * (MAX_BLOB + 1)


@pytest.mark.slow
def test_a_listing_over_the_blob_limit_backs_up_restores_and_checks(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(COUNT):
            os.symlink(b"%06d/" % i + b"t" * (TARGET - 7), b"l%06d" % i, dir_fd=fd)
    finally:
        os.close(fd)
    assert cli("init").returncode == 0
    r = cli("backup", str(src))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = cli("restore", "latest", "--target", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    names = os.listdir(out / "src")
    assert len(names) == COUNT
    last = COUNT - 1
    assert os.readlink(out / "src" / f"l{last:06d}") == f"{last:06d}/" + "t" * (TARGET - 7)
    r = cli("check", "--read-data")
    assert r.returncode == 0, r.stdout + r.stderr
