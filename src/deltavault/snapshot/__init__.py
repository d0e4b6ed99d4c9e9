"""Point-in-time snapshots of a source's volume: btrfs, LVM, Windows VSS, or none.

    with take_snapshot("/srv/data", "auto") as snap:
        read_from(snap.source_path)      # the same tree, frozen
    # removed here, also on an error or Ctrl-C
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from deltavault.errors import SnapshotError, UsageError
from deltavault.fs.mounts import find_mount
from deltavault.snapshot.base import Runner, SnapshotHandle, Snapshotter, run_command
from deltavault.snapshot.btrfs import BtrfsSnapshotter
from deltavault.snapshot.lvm import LvmSnapshotter
from deltavault.snapshot.none import NoSnapshot
from deltavault.snapshot.vss import VssSnapshotter

SNAPSHOT_KINDS = ("auto", "btrfs", "lvm", "vss", "none")

__all__ = ["SNAPSHOT_KINDS", "SnapshotHandle", "Snapshotter", "make_snapshotter", "take_snapshot"]


def make_snapshotter(kind: str, path: str, *, runner: Runner = run_command) -> Snapshotter:
    if kind == "none":
        return NoSnapshot()
    if kind == "btrfs":
        return BtrfsSnapshotter(runner)
    if kind == "lvm":
        return LvmSnapshotter(runner)
    if kind == "vss":
        return VssSnapshotter(runner)
    if kind != "auto":
        raise UsageError(f"unknown snapshot kind {kind!r}; one of {', '.join(SNAPSHOT_KINDS)}")
    if sys.platform == "win32":
        return VssSnapshotter(runner)
    m = find_mount(path)
    if m.fstype == "btrfs":
        return BtrfsSnapshotter(runner)
    if m.source.startswith("/dev/mapper/") or m.source.startswith("/dev/dm-"):
        lvm = LvmSnapshotter(runner)
        try:
            lvm.lookup(m)
            return lvm
        except SnapshotError:
            pass
    return NoSnapshot(f"no snapshot: {m.fstype} on {m.source} ({m.mount_point}) offers none "
                      "that deltavault can take; reading the live files")


@contextmanager
def take_snapshot(path: str, kind: str = "auto", *, runner: Runner = run_command) -> Iterator[SnapshotHandle]:
    """Snapshot the volume holding ``path``; yields where to read it; always removes it."""
    if not os.path.exists(path) and sys.platform != "win32":
        raise UsageError(f"{path} does not exist")
    snap = make_snapshotter(kind, path, runner=runner)
    handle = snap.create(path)
    try:
        yield handle
    except BaseException as exc:
        try:
            snap.remove(handle)
        except SnapshotError as rm:  # the original error matters more; name the leftover too
            exc.add_note(f"the {handle.kind} snapshot {handle.ident} was not removed: {rm}")
        raise
    snap.remove(handle)
