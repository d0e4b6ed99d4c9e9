"""How a volume is reached, and what it can tell about its own changes.

An access opens a reader for this run and may carry a native change source with its own
checkpoint (a qemu dirty bitmap, a btrfs snapshot). ``commit`` runs after the snapshot is
saved: only then may the previous checkpoint go. ``abort`` undoes this run's checkpoint.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Protocol

from deltavault.fs.mounts import device_mounts
from deltavault.model.volume import Checkpoint
from deltavault.tracking.volume.base import ChangeSource
from deltavault.tracking.volume.readers import FileReader, VolumeReader


class Pending(Protocol):
    """Handles this client created (bitmaps, snapshots) that a killed run may leave behind."""

    pending: list[dict[str, str]]

    def add_pending(self, kind: str, handle: str, where: str) -> None: ...

    def drop_pending(self, handle: str) -> None: ...


def sweep(pending: Pending, kind: str, where: str, *, keep: str | None, previous: str | None,
          exists: Callable[[str], bool], remove: Callable[[str], str | None], what: str) -> list[str]:
    """After a saved snapshot: remove the previous checkpoint's handle and those of killed
    runs, keep this run's. Returns warnings for what could not be removed (retried later)."""
    stale = {p["handle"] for p in pending.pending if p.get("kind") == kind and p.get("where") == where}
    if previous:
        stale.add(previous)
    stale.discard(keep or "")
    warnings = []
    for handle in sorted(stale):
        if exists(handle):
            err = remove(handle)
            if err:
                warnings.append(f"old {what} {handle} could not be removed: {err}")
                continue
        pending.drop_pending(handle)
    if keep:
        pending.drop_pending(keep)
    return warnings


class VolumeAccess(Protocol):
    kind: str
    source_format: str  # what the snapshot records: raw, qcow2, vhdx, vmdk

    def open(self, prev: Checkpoint | None, new_id: str) -> VolumeReader: ...

    def native(self) -> ChangeSource | None: ...

    def commit(self) -> list[str]:
        """After the snapshot is saved; returns warnings (a leftover that could not go)."""
        ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class ReadOnlyAccess:
    """Access that keeps no change log of its own (no native change source): the snapshot's
    end, saved or not, only has to let go of what ``open`` took."""

    def native(self) -> ChangeSource | None:
        return None

    def commit(self) -> list[str]:
        self.close()
        return []

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class FileAccess(ReadOnlyAccess):
    """A block device or a raw image file, read directly."""

    kind = "file"
    source_format = "raw"

    def __init__(self, path: str) -> None:
        self.path = path
        self.reader: FileReader | None = None

    def open(self, prev: Checkpoint | None, new_id: str) -> VolumeReader:
        self.reader = FileReader(self.path)
        return self.reader

    def close(self) -> None:
        # The device stays open otherwise: a long-lived caller leaks descriptors, and a loop
        # device cannot be detached while they are held.
        if self.reader is not None:
            self.reader.close()
            self.reader = None


def mounted_rw(path: str) -> str | None:
    """Where the volume is mounted read-write (a device, or an image through a loop
    device), or None. Reading it then gives a consistent copy only if it is frozen."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    devs: set[str] = set()
    if stat.S_ISBLK(st.st_mode):
        devs.add(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    elif stat.S_ISREG(st.st_mode):
        try:
            for name in os.listdir("/sys/block"):
                try:
                    with open(f"/sys/block/{name}/loop/backing_file") as f:
                        backing = f.read().strip()
                    if backing == real:
                        with open(f"/sys/block/{name}/dev") as f:
                            devs.add(f.read().strip())
                except OSError:
                    continue
        except OSError:
            return None
    if not devs:
        return None
    try:
        return next((m.mount_point for m in device_mounts(devs) if m.writable), None)
    except OSError:
        return None
