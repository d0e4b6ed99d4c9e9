"""How a volume backup opens its source: the image format (probed from the first bytes, or
given with --source-format) and --cbt choose the access (tracking/volume/access.py)."""

from __future__ import annotations

from deltavault.backup.volume.options import VolumeOptions
from deltavault.backup.volume.state import LocalState
from deltavault.errors import UsageError
from deltavault.tracking.volume.access import FileAccess, VolumeAccess
from deltavault.tracking.volume.images import QEMU_ONLY, ImageAccess, probe


def open_access(path: str, opts: VolumeOptions, state: LocalState) -> VolumeAccess:
    if opts.cbt == "btrfs":
        from deltavault.tracking.volume.btrfs import BtrfsAccess

        return BtrfsAccess(path, snapshot_dir=opts.snapshot_dir, pending=state)
    fmt = probe(path) if opts.source_format == "auto" else opts.source_format
    if fmt in QEMU_ONLY:
        if opts.cbt == "qemu":
            raise UsageError(f"--cbt qemu needs a qcow2 image; {path} is {fmt}")
        return ImageAccess(path, fmt, probed=opts.source_format == "auto")
    if fmt == "qcow2":
        from deltavault.tracking.volume.qemu import QcowAccess

        return QcowAccess(path, track=opts.cbt in ("auto", "qemu"), granularity=opts.bitmap_granularity,
                          pending=state)
    if opts.cbt == "qemu":
        raise UsageError(f"--cbt qemu needs a qcow2 image; {path} is not one")
    return FileAccess(path)
