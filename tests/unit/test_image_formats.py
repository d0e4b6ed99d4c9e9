"""Image formats without qemu: probing by first bytes, the format a restore writes, and
manifests written before the source format was recorded."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from deltavault.backup.volume.opening import open_access
from deltavault.backup.volume.options import VolumeOptions
from deltavault.backup.volume.state import LocalState
from deltavault.errors import UsageError
from deltavault.model.volume import Segment, VolumeManifest, decode, encode
from deltavault.restore.imageformat import target_format
from deltavault.tracking.volume.images import probe


@pytest.mark.parametrize(("head", "fmt"), [
    (b"vhdxfile" + bytes(100), "vhdx"),
    (b"KDMV\x01\x00\x00\x00", "vmdk"),
    (b"COWD\x01\x00\x00\x00", "vmdk"),
    (b"\n# Disk DescriptorFile\nversion=1\n", "vmdk"),
    (b"QFI\xfb\x00\x00\x00\x03", "qcow2"),
    (bytes(512), "raw"),
    (b"# Disk Descriptor", "raw"),  # not the whole marker
])
def test_probe_reads_the_first_bytes(tmp_path: Path, head: bytes, fmt: str) -> None:
    p = tmp_path / "disk.img"
    p.write_bytes(head)
    assert probe(str(p)) == fmt


def test_a_name_does_not_make_a_format(tmp_path: Path) -> None:
    p = tmp_path / "disk.vhdx"
    p.write_bytes(bytes(4096))
    assert probe(str(p)) == "raw"
    assert probe(str(tmp_path / "missing.vmdk")) == "raw"


def test_source_format_chooses_the_access(tmp_path: Path) -> None:
    p = tmp_path / "disk.img"
    p.write_bytes(b"vhdxfile" + bytes(4096))
    state = LocalState.load(None, "x")
    assert open_access(str(p), VolumeOptions(), state).source_format == "vhdx"
    assert open_access(str(p), VolumeOptions(source_format="raw"), state).source_format == "raw"
    assert open_access(str(p), VolumeOptions(source_format="vmdk"), state).source_format == "vmdk"
    with pytest.raises(UsageError, match="qcow2"):
        open_access(str(p), VolumeOptions(cbt="qemu"), state)


def test_restore_format_rules() -> None:
    assert target_format("/tmp/out.img", None, "vhdx") == "raw"
    assert target_format("/tmp/out.VHDX", None, "") == "vhdx"
    assert target_format("/tmp/out.vmdk", None, "raw") == "vmdk"
    assert target_format("/tmp/out.qcow2", None, "") == "qcow2"
    assert target_format("/tmp/out.vmdk", "raw", "vmdk") == "raw"
    assert target_format("/tmp/out", "original", "vmdk") == "vmdk"
    assert target_format("/tmp/out", "original", "") == "raw"  # older snapshots
    with pytest.raises(UsageError, match="block device"):
        target_format(_a_block_device(), "vhdx", "")


def _a_block_device() -> str:
    import os
    import stat

    for name in sorted(os.listdir("/dev")):
        path = f"/dev/{name}"
        try:
            if stat.S_ISBLK(os.stat(path).st_mode):
                return path
        except OSError:
            continue
    pytest.skip("no block device to name")


def test_manifests_without_a_source_format_still_read() -> None:
    m = VolumeManifest(size=4096, block_size=4096, segments=[Segment(b"m" * 32, b"d" * 32)])
    old = msgspec.msgpack.decode(encode(m))
    assert "source_format" not in old  # omitted by default: the old encoding exactly
    assert decode(msgspec.msgpack.encode(old), VolumeManifest, "manifest").source_format == ""
    new = msgspec.structs.replace(m, source_format="vmdk")
    assert decode(encode(new), VolumeManifest, "manifest").source_format == "vmdk"


def test_cleaning_up_a_failed_conversion_never_raises_in_place_of_its_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temporaries of a failed run are removed if they can be: a failure to remove them
    (here: unlink refused) is not reported instead of the run's own error."""
    import os
    import shutil

    from deltavault.errors import TargetError
    from deltavault.restore import imageformat

    monkeypatch.setattr(shutil, "which", lambda _name: "/usr/bin/qemu-img")

    def restore_raw(path: str) -> object:
        with open(path, "wb") as f:
            f.write(b"x")
        raise TargetError("the run's own error")

    real_unlink = os.unlink

    def refuse(name: object, *args: object, **kw: object) -> None:
        if kw.get("dir_fd") is not None:
            raise PermissionError(1, "refused")
        real_unlink(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", refuse)
    with pytest.raises(TargetError, match="the run's own error"):
        imageformat.restore_as("qcow2", str(tmp_path / "disk.qcow2"), restore_raw,  # type: ignore[arg-type]
                               overwrite=False, verify=False)
