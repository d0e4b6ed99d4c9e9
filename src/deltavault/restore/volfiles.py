"""File-level restore from a volume snapshot: chosen files out of a disk image, without
restoring the image.

The image is served by a FUSE mount of this process (restore/mount) on a private
directory; a read-only loop device over it (over one partition's file, for a partitioned
disk) is mounted read-only on another private directory by the kernel (ext2/3/4, XFS,
btrfs) or by ntfs-3g; the chosen paths are copied into the target with their metadata
(restore/fscopy.py); then everything is undone in reverse order. The file system reads
only the blocks it needs (superblock, inode tables, directories, the files' extents), and
only those blocks come from the repository: the result says how many bytes that was.

The image is mounted without journal replay (``noload``, ``norecovery``,
``rescue=nologreplay``): a volume backed up while mounted would otherwise need writes.
Undone on every exit path, Ctrl-C and SIGTERM included (the CLI turns SIGTERM into an
exception); a SIGKILL leaves mounts and a loop device behind, which ``umount`` and
``losetup -d`` clear.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from deltavault.errors import SourceError, Unavailable, UsageError
from deltavault.model.snapshot import Snapshot
from deltavault.progress import NullReporter, Reporter
from deltavault.repository.repository import Repository
from deltavault.restore.fscopy import CopyStats, TreeCopier
from deltavault.restore.mount.blobs import DEFAULT_CACHE, MountBlobs
from deltavault.restore.mount.namespace import Namespace
from deltavault.restore.mount.partitions import MOUNTABLE, Partition, fs_type
from deltavault.restore.mount.session import BackgroundMount, deferred_signals, is_mount_point

# Mount options that keep a read-only mount from writing (journal replay) and from minding
# that the same file system may be mounted elsewhere (XFS refuses a duplicate uuid).
FS_OPTIONS = {"ext4": "noload", "xfs": "norecovery,nouuid", "btrfs": "rescue=nologreplay", "ntfs": ""}


@dataclass
class VolumeFilesOptions:
    files: list[str]
    target: str
    partition: int | None = None
    fstype: str | None = None  # what the user expects; refused when the image holds another
    owner: bool = True
    cache_bytes: int = DEFAULT_CACHE


@dataclass
class VolumeFilesResult:
    image: str = ""  # disk.img or partN.img
    fstype: str = ""
    bytes_read: int = 0  # from the repository
    volume_size: int = 0
    seconds: float = 0.0
    copy: CopyStats = field(default_factory=CopyStats)


def choose(whole: str, parts: list[Partition], opts: VolumeFilesOptions) -> tuple[str, str]:
    """(image file name, file-system type) to mount, or a clear refusal. ``whole``: the file
    system at the start of an unpartitioned volume."""
    if parts:
        if opts.partition is not None:
            found = [p for p in parts if p.number == opts.partition]
            if not found:
                raise UsageError(f"the disk has no partition {opts.partition} "
                                 f"(it has {', '.join(str(p.number) for p in parts)})")
            chosen = found[0]
        else:
            usable = [p for p in parts if p.fstype in MOUNTABLE]
            if len(usable) > 1:
                listed = ", ".join(f"{p.number} ({p.fstype})" for p in usable)
                raise UsageError(f"several partitions hold file systems: {listed}; choose one with --partition N")
            if not usable:
                listed = ", ".join(f"{p.number} ({p.fstype or 'unknown'})" for p in parts)
                raise SourceError(f"no partition holds a file system deltavault can mount ({listed}; "
                                  f"it mounts {', '.join(MOUNTABLE)})")
            chosen = usable[0]
        name, found_type = f"part{chosen.number}.img", chosen.fstype
    else:
        if opts.partition is not None:
            raise UsageError("the volume has no partition table: leave out --partition")
        name, found_type = "disk.img", whole
    held = found_type or "no file system deltavault knows"
    if opts.fstype and opts.fstype != found_type:
        raise SourceError(f"the volume holds {held}" + (f" in partition {opts.partition}" if parts else "")
                          + f", not {opts.fstype}")
    if found_type not in MOUNTABLE:
        raise SourceError(f"the volume holds {held}; file-level restore mounts {', '.join(MOUNTABLE)}")
    return name, found_type


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True)


def _retry(argv: list[str], lazy: list[str]) -> None:
    for _ in range(50):
        if _run(argv).returncode == 0:
            return
        time.sleep(0.1)
    _run(lazy)


@contextmanager
def mounted_fs(image: str, fstype: str) -> Iterator[str]:
    """The file system in ``image`` mounted read-only on a new private directory."""
    if os.geteuid() != 0:
        raise Unavailable("file-level restore from a volume mounts the image with the kernel: run it as root")
    tools = ["losetup", "mount", "umount"] + (["ntfs-3g"] if fstype == "ntfs" else [])
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise Unavailable(f"file-level restore needs {', '.join(missing)} (scripts/install-system-deps.sh)")
    undo = ExitStack()
    try:
        with deferred_signals():  # each step happens and is recorded for undoing, or neither
            where = tempfile.mkdtemp(prefix="dv-fs-")
            undo.callback(os.rmdir, where)
            undo.callback(_detach_all, image)  # also what an interrupted losetup attached
            p = _run(["losetup", "--find", "--show", "--read-only", image])
            if p.returncode != 0:
                raise Unavailable(f"no loop device for the image: {p.stderr.strip()}")
            dev = p.stdout.strip()
        with deferred_signals():
            undo.callback(_unmount, where)
            opts = ",".join(x for x in ("ro,nosuid,nodev,noexec", FS_OPTIONS[fstype]) if x)
            argv = (["ntfs-3g", "-o", opts, dev, where] if fstype == "ntfs" else
                    ["mount", "-t", fstype, "-o", opts, dev, where])
            p = _run(argv)
            if p.returncode != 0:
                raise SourceError(f"the {fstype} file system of the volume does not mount read-only: "
                                  f"{(p.stderr or p.stdout).strip()}")
        yield where
    finally:
        with deferred_signals():
            undo.close()


def _unmount(where: str) -> None:
    if is_mount_point(where):
        _retry(["umount", where], ["umount", "-l", where])


def _detach_all(image: str) -> None:
    """Detach every loop device over ``image`` (``losetup -j`` finds them by backing file)."""
    for line in _run(["losetup", "-j", image]).stdout.splitlines():
        dev = line.split(":", 1)[0]
        if dev:
            _retry(["losetup", "-d", dev], ["losetup", "-d", dev])


def restore_volume_files(repo: Repository, sid: str, snap: Snapshot, opts: VolumeFilesOptions,
                         reporter: Reporter | None = None) -> VolumeFilesResult:
    reporter = reporter or NullReporter()
    opts.target = os.path.abspath(opts.target)
    t0 = time.monotonic()
    before = repo.traffic.bytes_read
    res = VolumeFilesResult()
    blobs = MountBlobs(repo, opts.cache_bytes)
    try:
        ns = Namespace(repo, blobs, snapshot=sid, refresh=float("inf"), reporter=reporter)
        view, parts = ns.volume(sid, snap)
        res.volume_size = view.size
        res.image, res.fstype = choose("" if parts else fs_type(view), parts, opts)
        reporter.start("restore")
        with BackgroundMount(ns) as images, mounted_fs(os.path.join(images, res.image), res.fstype) as root:
            copier = TreeCopier(root, opts.target, owner=opts.owner, ntfs=res.fstype == "ntfs",
                                reporter=reporter)
            res.copy = copier.run(opts.files)
        reporter.finish()
    finally:
        blobs.close()
    res.bytes_read = repo.traffic.bytes_read - before
    res.seconds = time.monotonic() - t0
    return res
