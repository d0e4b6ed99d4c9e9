"""btrfs: a read-only snapshot of the subvolume holding the path.

The snapshot goes into ``<subvolume>/.deltavault-snapshots/`` (a snapshot must live on the
same file system), which sync excludes by default. Subvolumes nested below the path are
not part of a snapshot: they appear in it as empty directories.
"""

from __future__ import annotations

import os
import secrets
import time

from deltavault.errors import SnapshotError
from deltavault.fs.mounts import SNAPSHOT_DIR, find_mount, subvolume_root
from deltavault.snapshot.base import Runner, SnapshotHandle, run_command
from deltavault.snapshot.none import relative_inside


class BtrfsSnapshotter:
    kind = "btrfs"

    def __init__(self, runner: Runner = run_command) -> None:
        self.run = runner

    def create(self, path: str) -> SnapshotHandle:
        real = os.path.realpath(path)
        m = find_mount(real)
        if m.fstype != "btrfs":
            raise SnapshotError(f"{path} is on {m.fstype} ({m.mount_point}), not btrfs")
        subvol = subvolume_root(real, m.mount_point)
        snapdir = os.path.join(subvol, SNAPSHOT_DIR)
        os.makedirs(snapdir, mode=0o700, exist_ok=True)
        snap = os.path.join(snapdir, f"sync-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}")
        try:
            self.run(snapshot_command(subvol, snap))
        except BaseException:
            if os.path.isdir(snap):  # interrupted after btrfs made it
                self._delete(snap)
            raise
        rel = relative_inside(real, subvol)
        return SnapshotHandle("btrfs", snap, os.path.join(snap, rel) if rel else snap, path, ident=snap)

    def remove(self, handle: SnapshotHandle) -> None:
        self._delete(handle.ident)

    def _delete(self, snap: str) -> None:
        self.run(delete_command(snap))
        try:
            os.rmdir(os.path.dirname(snap))  # only when no other run's snapshot is there
        except OSError:
            pass


def snapshot_command(subvol: str, snap: str) -> list[str]:
    return ["btrfs", "subvolume", "snapshot", "-r", subvol, snap]


def delete_command(snap: str) -> list[str]:
    # --commit-after: the space is freed (and the deletion durable) when the command returns.
    return ["btrfs", "subvolume", "delete", "--commit-after", snap]
