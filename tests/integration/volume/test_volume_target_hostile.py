"""A volume restored to an image file in a directory other users may write in. The target
was examined with stat, which follows a symlink: one planted under the target's name, to
a block device, had the volume written over that device (with --overwrite, as for an image
replaced each night). A conversion (qcow2...) restored raw into a temporary file of a name
known in advance (``.NAME.dv-raw-PID``), always with overwrite, and qemu-img wrote a second
(``.NAME.dv-qcow2-PID``) by path: symlinks planted under those names had a device and a
root-only file outside overwritten, with no option given at all. Now the target's directory
is held open and every step is made in it by fd, the temporary files in a private directory
of a random name; a symlink is followed only in a directory nobody else may write in
(``/dev/disk/by-id``)."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltavault.errors import TargetError, UsageError
from deltavault.model.volume import VolumeManifest
from deltavault.objects.volumes import load_manifest
from deltavault.restore.imageformat import restore_as
from deltavault.restore.volume import VolumeRestoreOptions, VolumeRestorer, VolumeRestoreStats
from deltavault.testing.hostile import NOBODY
from tests.conftest import needs_root, needs_tools
from tests.integration.volume.conftest import Vol, loop, sha256

pytestmark = [needs_root(), pytest.mark.root, needs_tools("losetup", "qemu-img")]

MiB = 1 << 20


def _volume(vol: Vol, tmp: Path) -> tuple[VolumeManifest, str]:
    """A 2 MiB volume backed up: its manifest and the sha256 of its content."""
    raw = tmp / "volume.raw"
    raw.write_bytes(os.urandom(MiB) + bytes(MiB))
    sid = vol.backup(raw).snapshot_id
    _sid, snap = vol.repo.resolve_snapshot(sid)
    assert snap.volume is not None
    return load_manifest(vol.repo, snap.volume), sha256(raw)


def _restorer(vol: Vol, manifest: VolumeManifest, target: str, *, overwrite: bool) -> VolumeRestorer:
    key = vol.repo.master.mac if vol.repo.master else None
    return VolumeRestorer(vol.repo, manifest, target, VolumeRestoreOptions(overwrite=overwrite, verify=True,
                                                                           page_key=key))


def _plant(link: Path, to: Path | str) -> None:
    """A symlink of user nobody's."""
    os.symlink(to, link)
    os.lchown(link, NOBODY, NOBODY)


@pytest.fixture
def shared(shared_dir: Path) -> Path:
    d = shared_dir / "images"  # a directory every user may write in (not sticky)
    d.mkdir()
    d.chmod(0o777)
    return d


@pytest.fixture
def device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loop device outside the target, over a file of 0xAA bytes: (device, its file)."""
    backing = tmp_path / "disk.bin"
    backing.write_bytes(b"\xaa" * 2 * MiB)
    with loop(backing) as dev:
        yield dev, backing


def _sync(dev: str) -> None:
    """What was written to the device, down to its backing file."""
    fd = os.open(dev, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_symlink_planted_as_the_target_never_leads_to_a_device(vol: Vol, tmp_path: Path, shared: Path,
                                                                 device: tuple[str, Path]) -> None:
    manifest, want = _volume(vol, tmp_path)
    dev, backing = device
    before = _digest(backing)
    target = shared / "vm.img"
    _plant(target, dev)
    try:
        _restorer(vol, manifest, str(target), overwrite=True).run()
        refused = ""
    except UsageError as exc:
        refused = str(exc)
    _sync(dev)
    assert _digest(backing) == before  # the device is untouched
    assert "not followed" in refused
    assert os.readlink(target) == dev
    # The same link of ours in a directory only we may write in is followed (/dev/disk/by-id).
    private = tmp_path / "by-id"
    private.mkdir(mode=0o755)
    os.symlink(dev, private / "disk")
    st = _restorer(vol, manifest, str(private / "disk"), overwrite=True).run()
    assert st.target_kind == "device" and st.pages_mismatched == 0
    assert stat.S_ISLNK(os.lstat(private / "disk").st_mode)
    assert sha256(dev) == want


def test_temporary_names_planted_beforehand_lead_nowhere(vol: Vol, tmp_path: Path, shared: Path,
                                                         device: tuple[str, Path]) -> None:
    manifest, want = _volume(vol, tmp_path)
    dev, backing = device
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only\n")
    secret.chmod(0o600)
    before = (_digest(backing), _digest(secret))
    target = shared / "vm.qcow2"
    pid = os.getpid()  # the names the restore used: the attacker sees its pid in /proc
    _plant(shared / f".vm.qcow2.dv-raw-{pid}", dev)
    _plant(shared / f".vm.qcow2.dv-qcow2-{pid}", secret)
    _plant(shared / f"..vm.qcow2.dv-raw-{pid}.dv-restore-{pid}", secret)

    def restore_raw(path: str) -> VolumeRestoreStats:
        return _restorer(vol, manifest, path, overwrite=True).run()

    st = restore_as("qcow2", str(target), restore_raw, overwrite=False, verify=True)
    assert st.pages_mismatched == 0
    _sync(dev)
    assert (_digest(backing), _digest(secret)) == before  # nothing outside written
    assert stat.S_ISREG(os.lstat(target).st_mode)
    raw = tmp_path / "back.raw"
    assert os.system(f"qemu-img convert -f qcow2 -O raw '{target}' '{raw}'") == 0
    assert sha256(raw) == want
    # only the planted names are left beside the target: no temporary of the run's
    assert sorted(p.name for p in shared.iterdir()) == sorted(
        [f".vm.qcow2.dv-raw-{pid}", f".vm.qcow2.dv-qcow2-{pid}", f"..vm.qcow2.dv-raw-{pid}.dv-restore-{pid}",
         "vm.qcow2"])


def test_an_image_format_judges_the_target_as_a_raw_restore_does(vol: Vol, tmp_path: Path, shared: Path) -> None:
    """A qcow2 target was judged through the link (``os.stat``): a dangling symlink there was
    replaced without --overwrite, where a raw restore asks for it."""
    manifest, _want = _volume(vol, tmp_path)
    target = shared / "vm.qcow2"
    _plant(target, tmp_path / "nowhere")

    def restore_raw(path: str) -> VolumeRestoreStats:
        return _restorer(vol, manifest, path, overwrite=True).run()

    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        restore_as("qcow2", str(target), restore_raw, overwrite=False, verify=False)
    assert os.readlink(target) == str(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        _restorer(vol, manifest, str(target), overwrite=False).run()  # the raw restore, alike


def test_a_symlink_of_another_user_to_the_targets_directory_is_refused(vol: Vol, tmp_path: Path,
                                                                      shared: Path) -> None:
    """The image's directory was opened by path, following every symlink: nobody made
    ``images/vms`` a symlink to a directory of root's, and root's restore (with --overwrite,
    as for an image replaced each night) replaced root's file of that name there. A symlink
    of another user on the way to the directory is now refused (exit 17), nothing touched;
    root's own is followed."""
    manifest, want = _volume(vol, tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "vm.img").write_bytes(b"root's\n")
    _plant(shared / "vms", precious)
    with pytest.raises(TargetError, match=r"a symlink of another user \(uid 65534\)") as exc:
        _restorer(vol, manifest, str(shared / "vms" / "vm.img"), overwrite=True).run()
    assert exc.value.exit_code == 17
    assert os.listdir(precious) == ["vm.img"] and (precious / "vm.img").read_bytes() == b"root's\n"
    (tmp_path / "ours").symlink_to(precious)
    _restorer(vol, manifest, str(tmp_path / "ours" / "vm.img"), overwrite=True).run()
    assert sha256(precious / "vm.img") == want
