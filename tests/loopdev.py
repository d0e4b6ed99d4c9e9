"""Loop devices and mounts for tests, always released (retrying while the kernel is busy)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def run(*argv: str, check: bool = True) -> str:
    p = subprocess.run(argv, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr or p.stdout}")
    return p.stdout


def umount(path: str | Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def loop(image: str | Path, offset: int = 0, size: int = 0) -> Iterator[str]:
    """A loop device over ``image``, or over ``size`` bytes of it from ``offset`` (one partition)."""
    window = ["-o", str(offset)] + (["--sizelimit", str(size)] if size else [])
    dev = run("losetup", "-f", "--show", *window, str(image)).strip()
    try:
        yield dev
    finally:
        for _ in range(50):
            if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


@contextmanager
def mounted(source: str | Path, mnt: Path, *options: str) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    run("mount", *options, str(source), str(mnt))
    try:
        yield mnt
    finally:
        umount(mnt)


@contextmanager
def fresh_fs(workdir: Path, size: str, *mkfs: str) -> Iterator[Path]:
    """A new file system (``mkfs`` is the command, e.g. "mkfs.ext4", "-q", "-F") in an image
    of ``size`` under ``workdir``, loop-mounted at ``workdir/mnt``."""
    img = workdir / "fs.img"
    run("truncate", "-s", size, str(img))
    run(*mkfs, str(img))
    with loop(img) as dev, mounted(dev, workdir / "mnt") as mnt:
        yield mnt
