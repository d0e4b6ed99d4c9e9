"""btrfs: changes of an image file between two read-only snapshots of its subvolume.

Here the "volume" is a disk image file (a VM disk, a loop-mounted file system) that lives on
btrfs. Each backup takes a read-only snapshot of the subvolume holding it, under
``<subvolume>/.deltavault-snapshots/dv-<checkpoint id>``, and reads the image from that
snapshot, so the copy is point-in-time even while the image is in use. The next run
compares the image's extents in the two snapshots (FIEMAP): btrfs writes changed data to
new places, so a range mapped to the same physical bytes in both is unchanged. That holds
for nodatacow images too, because the kept snapshot shares their extents and forces the
next write to each to copy. Compressed extents cannot be compared this way and count as
changed. The previous snapshot is deleted only after the new backup is saved.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from deltavault.errors import SourceError, UsageError
from deltavault.fs.mounts import SNAPSHOT_DIR, subvolume_root
from deltavault.model.volume import Checkpoint, VolumeManifest
from deltavault.tracking.volume import fiemap, pagesets
from deltavault.tracking.volume.access import Pending, sweep
from deltavault.tracking.volume.base import Changes, Rejected, find_checkpoint
from deltavault.tracking.volume.readers import FileReader

NAME = "btrfs"
PREFIX = "dv-"


def _btrfs(args: list[str], what: str) -> str:
    try:
        p = subprocess.run(["btrfs", *args], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceError(f"{what}: {exc}") from exc
    if p.returncode != 0:
        raise SourceError(f"{what}: {(p.stderr or p.stdout).strip()}")
    return p.stdout


def is_btrfs(path: str) -> bool:
    try:
        p = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and p.stdout.strip() == "btrfs"


def subvolume_uuid(path: Path) -> str:
    for line in _btrfs(["subvolume", "show", str(path)], f"btrfs subvolume show {path}").splitlines():
        key, _, value = line.strip().partition(":")
        if key == "UUID":
            return value.strip()
    raise SourceError(f"btrfs subvolume show {path}: no UUID")


def _delete(snap: str) -> str | None:
    try:
        _btrfs(["subvolume", "delete", snap], f"deleting snapshot {snap}")
    except SourceError as exc:
        return str(exc)
    return None


def _sweep(pending: Pending, image: str, prev: Checkpoint | None, *, keep: str | None) -> list[str]:
    previous = prev.token if prev is not None and Path(prev.token).name.startswith(PREFIX) else None
    return sweep(pending, NAME, image, keep=keep, previous=previous, exists=os.path.isdir, remove=_delete,
                 what="snapshot")


def retire(prev: Checkpoint, image: str, pending: Pending) -> list[str]:
    """After a saved snapshot that used another change source: delete the last btrfs
    snapshot (and those of killed runs). Nothing compares against them any more, and a kept
    snapshot pins every block the image has rewritten since."""
    return _sweep(pending, os.path.abspath(image), prev, keep=None)


class BtrfsAccess:
    kind = "btrfs"
    source_format = "raw"  # the image file's bytes as they are

    def __init__(self, path: str, *, snapshot_dir: str | None, pending: Pending) -> None:
        self.path = Path(os.path.abspath(path))
        if not is_btrfs(str(self.path)):
            raise UsageError(f"--cbt btrfs: {path} is not on a btrfs file system")
        self.root = Path(subvolume_root(str(self.path)))
        self.rel = self.path.relative_to(self.root)
        # absolute: the handle is recorded as pending and removed by a later run, from any cwd
        self.snap_dir = Path(os.path.abspath(snapshot_dir)) if snapshot_dir else self.root / SNAPSHOT_DIR
        self.pending = pending
        self.prev: Checkpoint | None = None
        self.new: Path | None = None
        self.new_id = ""
        self.new_uuid = ""
        self.reader: FileReader | None = None

    def open(self, prev: Checkpoint | None, new_id: str) -> FileReader:
        self.prev = prev
        self.snap_dir.mkdir(parents=True, exist_ok=True)
        self.new_id = new_id
        self.new = self.snap_dir / (PREFIX + new_id)
        self.pending.add_pending(NAME, str(self.new), str(self.path))
        _btrfs(["subvolume", "snapshot", "-r", str(self.root), str(self.new)],
               f"snapshotting {self.root}")
        self.new_uuid = subvolume_uuid(self.new)
        self.reader = FileReader(str(self.new / self.rel))
        self.reader.description = f"{self.path} (btrfs snapshot {self.new.name})"
        return self.reader

    def native(self) -> BtrfsSource:
        return BtrfsSource(self)

    def commit(self) -> list[str]:
        self.close()
        return _sweep(self.pending, str(self.path), self.prev, keep=str(self.new) if self.new else None)

    def abort(self) -> None:
        self.close()
        if self.new is not None and self.new.exists() and _delete(str(self.new)) is None:
            self.pending.drop_pending(str(self.new))

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def checkpoint(self) -> Checkpoint | None:
        if self.new is None:
            return None
        return Checkpoint(source=NAME, id=self.new_id, token=str(self.new), uuid=self.new_uuid)


class BtrfsSource:
    name = NAME

    def __init__(self, access: BtrfsAccess) -> None:
        self.access = access

    def changes(self, prev: VolumeManifest | None) -> Changes:
        ck = find_checkpoint(prev, NAME)
        a = self.access
        old_root = Path(ck.token)
        if old_root.name != PREFIX + ck.id:
            raise Rejected(f"snapshot {old_root} does not belong to checkpoint {ck.id}")
        if not old_root.is_dir():
            raise Rejected(f"the previous snapshot {old_root} is gone")
        try:
            uuid = subvolume_uuid(old_root)
        except SourceError as exc:
            raise Rejected(f"the previous snapshot {old_root} cannot be inspected: {exc}") from None
        if uuid != ck.uuid:
            raise Rejected(f"{old_root} is another subvolume now (uuid {uuid}, expected {ck.uuid})")
        old_file = old_root / a.rel
        assert a.reader is not None
        try:
            fd_old = os.open(old_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise Rejected(f"the image is missing from the previous snapshot: {exc.strerror}") from None
        try:
            size_old = os.fstat(fd_old).st_size
            if size_old != a.reader.size:
                raise Rejected(f"the image was resized ({size_old} -> {a.reader.size} bytes)")
            old = fiemap.extents(fd_old, size_old)
            new = fiemap.extents(a.reader.fd, a.reader.size)
        except OSError as exc:
            raise Rejected(f"FIEMAP failed: {exc.strerror}") from None
        finally:
            os.close(fd_old)
        ranges = fiemap.changed_ranges(old, new, a.reader.size)
        nbytes = sum(t - s for s, t in ranges)
        pages = pagesets.from_byte_ranges(((s, t - s) for s, t in ranges), outward=True)
        return Changes(NAME, pages, dirty_bytes=nbytes,
                       notes=[f"{len(new)} extents now, {len(old)} before; {nbytes} bytes remapped"])

    def checkpoint(self) -> Checkpoint | None:
        return self.access.checkpoint()
