"""LVM: a copy-on-write snapshot LV of the logical volume holding the path, mounted read-only.

Not runnable on the development machine (its kernel has no device-mapper); the command
lines and the parsing of ``lvs`` output are unit-tested.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass

from deltavault.errors import SnapshotError
from deltavault.fs.mounts import Mount, find_mount
from deltavault.snapshot.base import Runner, SnapshotHandle, run_command
from deltavault.snapshot.none import relative_inside

# Copy-on-write space reserved for the snapshot; if the origin changes more than this while
# the sync runs, the snapshot becomes invalid and reads fail (the sync then reports errors).
DEFAULT_EXTENTS = "10%ORIGIN"


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    lv: str
    attr: str


def lvs_command(device: str) -> list[str]:
    return ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
            "-o", "vg_name,lv_name,lv_attr,lv_size", device]


def parse_lvs(out: str, device: str = "the device") -> LogicalVolume:
    try:
        rows = json.loads(out)["report"][0]["lv"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise SnapshotError(f"cannot read the output of lvs: {out[:200]!r}") from exc
    if not rows:
        raise SnapshotError(f"{device} is not an LVM logical volume")
    row = rows[0]
    try:
        return LogicalVolume(row["vg_name"], row["lv_name"], row.get("lv_attr", ""))
    except (KeyError, TypeError) as exc:
        raise SnapshotError(f"cannot read the output of lvs: {out[:200]!r}") from exc


def lvcreate_command(lv: LogicalVolume, name: str, extents: str = DEFAULT_EXTENTS) -> list[str]:
    return ["lvcreate", "--snapshot", "--permission", "r", "--extents", extents, "--name", name,
            f"{lv.vg}/{lv.lv}"]


def mount_command(device: str, fstype: str, target: str) -> list[str]:
    opts = "ro"
    if fstype in ("ext3", "ext4"):
        opts += ",noload"  # the read-only snapshot's journal cannot be replayed
    elif fstype == "xfs":
        opts += ",nouuid,norecovery"  # same UUID as the mounted origin; no log replay
    return ["mount", "-t", fstype, "-o", opts, device, target]


def lvremove_command(lv: LogicalVolume, name: str) -> list[str]:
    return ["lvremove", "--yes", f"{lv.vg}/{name}"]


class LvmSnapshotter:
    kind = "lvm"

    def __init__(self, runner: Runner = run_command, extents: str = DEFAULT_EXTENTS) -> None:
        self.run = runner
        self.extents = extents

    def lookup(self, m: Mount) -> LogicalVolume:
        try:
            out = self.run(lvs_command(m.source))
        except SnapshotError as exc:
            # lvs fails outright for a device that is in no volume group
            raise SnapshotError(f"{m.mount_point} is mounted from {m.source}, which lvs does not know as "
                                f"an LVM logical volume ({exc.message})") from exc
        lv = parse_lvs(out, m.source)
        if lv.attr[:1] in ("s", "S"):
            raise SnapshotError(f"{m.source} is itself a snapshot")
        return lv

    def create(self, path: str) -> SnapshotHandle:
        real = os.path.realpath(path)
        m = find_mount(real)
        lv = self.lookup(m)
        name = f"{lv.lv}-dvsnap-{secrets.token_hex(3)}"
        self.run(lvcreate_command(lv, name, self.extents))
        mnt = ""
        try:
            mnt = tempfile.mkdtemp(prefix="deltavault-lvm-")
            self.run(mount_command(f"/dev/{lv.vg}/{name}", m.fstype, mnt))
        except BaseException:
            self._cleanup(lv, name, mnt, mounted=False)
            raise
        inside = os.path.join(mnt, m.root.lstrip("/"), relative_inside(real, m.mount_point))
        return SnapshotHandle("lvm", mnt, os.path.normpath(inside), path, ident=f"{lv.vg}/{lv.lv}/{name}")

    def remove(self, handle: SnapshotHandle) -> None:
        vg, lv, name = handle.ident.split("/")
        self._cleanup(LogicalVolume(vg, lv, ""), name, handle.mount_path, mounted=True)

    def _cleanup(self, lv: LogicalVolume, name: str, mnt: str, *, mounted: bool) -> None:
        errors = []
        if mounted and mnt:
            try:
                self.run(["umount", mnt])
            except SnapshotError as exc:
                errors.append(str(exc))
        try:
            self.run(lvremove_command(lv, name))
        except SnapshotError as exc:
            errors.append(str(exc))
        if mnt:
            try:
                os.rmdir(mnt)
            except OSError:
                pass
        if errors:
            raise SnapshotError(f"snapshot {lv.vg}/{name} not fully removed: " + "; ".join(errors))
