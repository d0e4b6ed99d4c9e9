"""A fresh ext4 on a loop device for each timed restore (bench/sftp.py, bench/scale_files.py,
bench/headline.py). Needs root."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.loopdev import fresh_fs


@contextmanager
def restore_fs(work: Path, size: str, *mkfs_options: str) -> Iterator[Path]:
    """The mount point of a new ext4 of ``size`` (sparse) under ``work``, synced, removed after.
    A new one each time: on a file system that has just deleted the previous restore's files,
    creating inodes was seen to cost every tool several seconds."""
    scratch = work / "restore-fs"
    scratch.mkdir()
    try:
        with fresh_fs(scratch, size, "mkfs.ext4", "-q", "-F", *mkfs_options) as mnt:
            subprocess.run(["sync"], check=True)
            yield mnt
    finally:
        shutil.rmtree(scratch)
