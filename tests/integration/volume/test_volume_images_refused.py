"""VHDX and VMDK images refused, and runs that fail, leaving nothing behind: no qemu-nbd,
no socket directory, no target or temporary file (split from test_volume_images.py)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from deltavault.backup.volume.options import VolumeRequest
from deltavault.backup.volume.run import VolumeBackup
from deltavault.errors import ExitCode
from deltavault.progress import NullReporter
from deltavault.tracking.volume import nbdlib
from tests.conftest import Cli, needs_root, needs_tools
from tests.integration.volume.conftest import (
    Vol,
    mounted,
    sha256,
)
from tests.integration.volume.test_volume_images import MiB, convert, nbd_leftovers, random_image
from tests.waits import until

pytestmark = [needs_tools("qemu-img", "qemu-nbd"),
              pytest.mark.skipif(not nbdlib.available(), reason="needs python3-libnbd")]


def test_damaged_images_are_refused_with_the_source_exit_code(cli: Cli, tmp_path: Path) -> None:
    vhdx, _ = random_image(tmp_path, "vhdx")
    assert cli("init").returncode == 0
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir)}

    truncated = tmp_path / "truncated.vhdx"
    truncated.write_bytes(vhdx.read_bytes()[:vhdx.stat().st_size // 2])
    damaged = tmp_path / "damaged.vhdx"
    blob = bytearray(vhdx.read_bytes())
    blob[64 * 1024:64 * 1024 + 4096] = os.urandom(4096)  # both headers' first copy
    blob[128 * 1024:128 * 1024 + 4096] = os.urandom(4096)
    damaged.write_bytes(bytes(blob))
    flat = tmp_path / "flat-content.raw"
    flat.write_bytes(os.urandom(4 * MiB))
    desc = convert(flat, "vmdk", tmp_path / "split.vmdk", "-o", "subformat=monolithicFlat")
    (tmp_path / "split-flat.vmdk").unlink()

    for img, message in ((truncated, "Image has probably been truncated"), (damaged, "damaged.vhdx"),
                         (desc, "split-flat.vmdk': No such file")):
        r = cli("--json", "backup", "--volume", str(img), env=env)
        assert r.returncode == ExitCode.SOURCE, (img, r.stdout, r.stderr)
        error = r.last("error")["message"]
        assert f"cannot open {img} as a" in error and message in error, error
        assert nbd_leftovers(img, tmpdir) == []
    r = cli("--json", "snapshots")
    assert [x for x in r.json if x.get("kind") == "volume"] == []
    c = cli("--json", "check", "--read-data")
    assert c.returncode == 0 and c.last("check_summary")["errors"] == 0, c.stdout
    assert cli("backup", "--volume", str(vhdx)).returncode == 0  # the repository is fine


def test_an_image_in_use_is_refused(cli: Cli, tmp_path: Path) -> None:
    img, _ = random_image(tmp_path, "vhdx")
    assert cli("init").returncode == 0
    sock = tmp_path / "writer.sock"
    writer = subprocess.Popen(["qemu-nbd", "-f", "vhdx", "-k", str(sock), str(img)])  # as a VM would
    try:
        until(sock.exists, "qemu-nbd", writer)  # not probed: without -t, qemu-nbd serves one client
        r = cli("--json", "backup", "--volume", str(img))
        assert r.returncode == ExitCode.SOURCE, r.stdout
        assert "(in use)" in r.last("error")["message"], r.stdout
    finally:
        writer.terminate()
        writer.wait(10)
    assert cli("backup", "--volume", str(img)).returncode == 0


def test_a_run_that_fails_after_qemu_nbd_started_stops_it(vol: Vol, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    img, _ = random_image(tmp_path, "vmdk")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))

    class Crash(Exception):
        pass

    class CrashingReporter(NullReporter):
        def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
            assert nbd_leftovers(img, tmpdir), "qemu-nbd should be serving the image now"
            raise Crash

    with pytest.raises(Crash):
        VolumeBackup(vol.repo, VolumeRequest(str(img), source_id="test-volume"), CrashingReporter()).run()
    assert nbd_leftovers(img, tmpdir) == []
    assert vol.repo.list_snapshots() == []


def test_a_server_that_cannot_start_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltavault.errors import SourceError
    from deltavault.tracking.volume.qemu import NbdServer

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    missing = tmp_path / "gone.vmdk"
    server = NbdServer(str(missing), None, fmt="vmdk")
    with pytest.raises(SourceError, match="qemu-nbd exited"):
        server.connect(["base:allocation"])
    assert server.proc.poll() is not None
    assert nbd_leftovers(missing, tmpdir) == []


def test_a_probed_vmdk_may_not_name_extents_elsewhere(cli: Cli, tmp_path: Path) -> None:
    """A guest can write a VMDK descriptor into the first sector of its raw disk; probing
    must not then read host files through it."""
    secret = tmp_path / "host" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"host data " * 100_000)
    guest = tmp_path / "guests" / "vm.img"
    guest.parent.mkdir()
    desc = (f'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
            f'RW {secret.stat().st_size // 512} FLAT "../host/secret.bin" 0\n').encode()
    guest.write_bytes(desc.ljust(1 * MiB, b"\0"))
    assert cli("init").returncode == 0
    r = cli("--json", "backup", "--volume", str(guest))
    assert r.returncode == ExitCode.SOURCE, r.stdout
    assert "outside its directory" in r.last("error")["message"]
    # said explicitly, the raw bytes of the guest's disk are backed up as they are
    r = cli("--json", "backup", "--volume", str(guest), "--source-format", "raw")
    assert r.returncode == 0, r.stderr
    assert r.last("summary")["source_format"] == "raw" and r.last("summary")["size"] == MiB


@needs_root()
@pytest.mark.root
def test_a_conversion_without_room_leaves_no_target_and_no_temporaries(cli: Cli, tmp_path: Path) -> None:
    img, _raw = random_image(tmp_path, "vhdx")  # 8 MiB of data
    assert cli("init").returncode == 0
    assert cli("backup", "--volume", str(img)).returncode == 0
    with mounted("tmpfs", tmp_path / "small", "-t", "tmpfs", "-o", "size=12m") as small:
        r = cli("--json", "restore", "--volume", "latest", str(small / "out.vhdx"))
        assert r.returncode == ExitCode.NO_SPACE, (r.stdout, r.stderr)
        assert "no space" in r.last("error")["message"]
        assert list(small.iterdir()) == []
        r = cli("--json", "restore", "--volume", "latest", str(small / "out.raw"))
        assert r.returncode == 0, r.stderr  # raw fits: the room was for the second copy


def test_qemu_nbd_dying_mid_run_fails_it_cleanly(vol: Vol, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The export goes away after blobs were stored: SourceError (exit 16), no snapshot, a
    repository that checks clean, and the next run works."""
    import signal

    from deltavault.errors import SourceError
    from deltavault.maintenance.check import check_repository

    img, raw = random_image(tmp_path, "vhdx", size=150 * MiB)  # three 64 MiB segments
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))

    class KillingReporter(NullReporter):
        def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
            for pid in nbd_leftovers(img, tmpdir):
                if pid.isdigit():
                    os.kill(int(pid), signal.SIGKILL)

    with pytest.raises(SourceError, match="NBD"):
        VolumeBackup(vol.repo, VolumeRequest(str(img), source_id="test-volume"), KillingReporter()).run()
    assert nbd_leftovers(img, tmpdir) == []
    assert vol.repo.list_snapshots() == []
    report = check_repository(vol.repo, read_data=True)
    assert not report.errors, [i.message for i in report.issues]
    r = vol.backup(img)
    assert sha256(vol.restore(r.snapshot_id)) == sha256(raw)
