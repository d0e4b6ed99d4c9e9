"""The local cache's atomic writer: parts in order, and nothing left on a full disk."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltavault.fs.files import write_cache_file, write_cache_parts
from tests.loopdev import umount


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a cache directory that fills up."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a small tmpfs)")
    disk = tmp_path / "cache"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        umount(disk)


@pytest.mark.root
def test_full_cache_disk_leaves_no_temp_file(small_disk: Path) -> None:
    disk = small_disk
    assert write_cache_file(disk / "index" / "small", b"x" * 1000)
    assert not write_cache_file(disk / "index" / "big", os.urandom(1024 * 1024))
    assert sorted(p.name for p in (disk / "index").iterdir()) == ["small"]
    assert (disk / "index" / "small").read_bytes() == b"x" * 1000


def test_many_parts_are_written_in_order(tmp_path: Path) -> None:
    # The built index is written as 65,536 buckets, several hundred to a writev.
    rnd = random.Random(1)
    parts = [rnd.randbytes(rnd.randrange(0, 300)) for _ in range(3000)]
    assert write_cache_parts(tmp_path / "c" / "many", [*parts[:1000], bytearray(b"".join(parts[1000:2000])),
                                                        memoryview(b"".join(parts[2000:]))])
    assert (tmp_path / "c" / "many").read_bytes() == b"".join(parts)


@pytest.mark.root
def test_full_disk_while_writing_parts_leaves_no_temp_file(small_disk: Path) -> None:
    assert not write_cache_parts(small_disk / "index.built", [os.urandom(1000) for _ in range(1024)])
    assert list(small_disk.iterdir()) == []
