"""The local cache's atomic writer on a full disk."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from deltavault.fs.files import write_cache_file
from tests.loopdev import umount


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts a small tmpfs)")
def test_full_cache_disk_leaves_no_temp_file(tmp_path: Path) -> None:
    disk = tmp_path / "cache"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=True)
    try:
        assert write_cache_file(disk / "index" / "small", b"x" * 1000)
        assert not write_cache_file(disk / "index" / "big", os.urandom(1024 * 1024))
        assert sorted(p.name for p in (disk / "index").iterdir()) == ["small"]
        assert (disk / "index" / "small").read_bytes() == b"x" * 1000
    finally:
        umount(disk)
