"""VHDX and VMDK images cut short (``truncate``): ``backup --volume`` refuses each with the
source exit code and a message that says so, stores nothing, and leaves no qemu-nbd behind.
qemu itself reads what lies past the end of a VMDK extent file as zeros, without a word
(``qemu-img info`` and ``check`` find nothing when only the last grain is cut), so a short
volume would otherwise be stored as if it were the disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deltavault.errors import ExitCode
from deltavault.tracking.volume import nbdlib
from tests.conftest import Cli, needs_tools
from tests.integration.volume.test_volume_images import (
    MiB,
    identical,
    nbd_leftovers,
    random_image,
)

pytestmark = [needs_tools("qemu-img", "qemu-nbd"),
              pytest.mark.skipif(not nbdlib.available(), reason="needs python3-libnbd")]

# (format, qemu-img convert options, which file to cut: "" the image, else the name's suffix)
KINDS = {
    "vhdx": ("vhdx", [], ""),
    "vmdk": ("vmdk", [], ""),
    "vmdk-2gb": ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"], "-s001.vmdk"),
    "vmdk-flat": ("vmdk", ["-o", "subformat=monolithicFlat"], "-flat.vmdk"),
    "vmdk-stream": ("vmdk", ["-o", "subformat=streamOptimized"], ""),
}


def make(tmp: Path, kind: str) -> tuple[Path, Path, Path]:
    """(the image, the file of it to cut, the raw content) of a fresh image of ``kind``."""
    fmt, opts, part = KINDS[kind]
    img, raw = random_image(tmp, fmt, opts=opts)  # disk.FMT, its extents disk-s001.vmdk, disk-flat.vmdk
    return img, (tmp / f"disk{part}" if part else img), raw


@pytest.mark.parametrize("kind", list(KINDS))
def test_truncated_image_is_refused(cli: Cli, tmp_path: Path, kind: str) -> None:
    img, cut, raw = make(tmp_path, kind)
    assert cli("init").returncode == 0
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir)}
    # The image whole backs up and restores equal to its content (the check refuses no sound image).
    r = cli("--json", "backup", "--volume", str(img), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert cli("restore", "--volume", "latest", "--target", str(tmp_path / "back.raw")).returncode == 0
    assert identical(tmp_path / "back.raw", raw)
    whole = cut.read_bytes()
    size = len(whole)
    for by in (512, 64 * 1024 + 512, MiB, size // 2):
        with open(cut, "wb") as f:
            f.write(whole[:size - by])
        r = cli("--json", "backup", "--volume", str(img), env=env)
        assert r.returncode == ExitCode.SOURCE, (kind, by, r.stdout, r.stderr)
        error = r.last("error")["message"]
        said = "Image has probably been truncated" if kind == "vhdx" else f"{cut} is {size - by} bytes long"
        assert f"cannot open {img} as a" in error and said in error, (kind, by, error)
        assert nbd_leftovers(img, tmpdir) == []
    cut.write_bytes(whole)
    r = cli("--json", "snapshots")
    assert len([x for x in r.json if x.get("kind") == "volume"]) == 1  # the sound image's only
    c = cli("--json", "check", "--read-data")
    assert c.returncode == 0 and c.last("check_summary")["errors"] == 0, c.stdout
    shutil.rmtree(tmpdir)
