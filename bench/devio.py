"""Bytes a run read from and wrote to a file system of its own, counted at its block device
(issue #18: bytes read from the source, written to and read from the repository, for every
tool alike, exact by construction rather than from the tool's own report).

bench/headline.py puts the source and the repositories each on a new ext4 on a loop device
of its own (``disk``). Every byte a run reads from the source is then a read of the source's
device and every byte it writes to or reads from its repository a write or read of the
repository's device; the tools' caches, the libraries and the restore target are on other
file systems and not counted. ``Disks.start``/``Disks.stop`` take the devices' sector counts
(/sys/block/loopN/stat, 512-byte units) around a run, after ``sync`` so that the run's
write-back is inside its count: file data plus the file system's own metadata and journal.

A read served from the page cache does not reach the device, so a count taken with a warm
cache says little about reads. ``start(cold=True)`` unmounts and mounts the file systems
again first (their page cache and the loop device's buffers go with the last close; the
buffers are flushed once more with ``blockdev --flushbufs``), so that every read of the run
reaches the device: that is the "counted round". mkfs initialises the inode tables and the
journal up front (``lazy_itable_init=0``) so that no kernel thread writes to them during a run,
and the file systems are mounted ``noatime`` so that reading the source writes nothing to it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.loopdev import loop, mounted, run, umount

MKFS = ("mkfs.ext4", "-q", "-F", "-i", "65536", "-E", "lazy_itable_init=0,lazy_journal_init=0")
MOUNT = ("-o", "noatime")


@dataclass
class Disk:
    mnt: Path
    dev: str  # /dev/loopN

    def sectors(self) -> tuple[int, int]:
        """(bytes read, bytes written) by the device since it was set up."""
        f = Path(f"/sys/block/{Path(self.dev).name}/stat").read_text().split()
        return int(f[2]) * 512, int(f[6]) * 512

    def remount(self) -> None:
        umount(self.mnt)
        run("blockdev", "--flushbufs", self.dev)
        run("mount", *MOUNT, self.dev, str(self.mnt))


class Disks:
    """Named disks; ``start`` and ``stop`` around each run give its bytes per disk."""

    def __init__(self, disks: dict[str, Disk]) -> None:
        self.disks = disks

    def start(self, *, cold: bool) -> dict[str, tuple[int, int]]:
        subprocess.run(["sync"], check=True)
        for d in self.disks.values() if cold else ():
            d.remount()
        if cold:
            subprocess.run(["sync"], check=True)  # the mount's own superblock and journal writes
        return {k: d.sectors() for k, d in self.disks.items()}

    def stop(self, before: dict[str, tuple[int, int]]) -> dict[str, int]:
        """``{name}_read`` and ``{name}_written`` bytes since ``before``."""
        subprocess.run(["sync"], check=True)
        out: dict[str, int] = {}
        for k, d in self.disks.items():
            r, w = d.sectors()
            out[f"{k}_read"], out[f"{k}_written"] = r - before[k][0], w - before[k][1]
        return out


@contextmanager
def disk(work: Path, name: str, size: str) -> Iterator[Disk]:
    """A new ext4 of ``size`` (a sparse image under ``work/name``), loop-mounted; removed after."""
    scratch = work / name
    scratch.mkdir(parents=True)
    try:
        img = scratch / "fs.img"
        run("truncate", "-s", size, str(img))
        run(*MKFS, str(img))
        with loop(img) as dev, mounted(dev, scratch / "mnt", *MOUNT) as mnt:
            yield Disk(mnt, dev)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def disks(work: Path, sizes: dict[str, str]) -> Iterator[Disks]:
    with ExitStack() as stack:
        yield Disks({k: stack.enter_context(disk(work, k, size)) for k, size in sizes.items()})
