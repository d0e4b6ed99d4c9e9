"""VHDX and VMDK images: read through qemu-nbd and libnbd, guest file systems tracked by
their metadata digests per partition, restored raw or in their own format; damaged images
refused with SourceError and nothing left behind (no qemu-nbd, no socket directory)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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
    backdate_ext4,
    backdate_ntfs,
    fill_tree,
    loop,
    mounted,
    run,
    sha256,
    umount,
)
from tests.waits import until

pytestmark = [needs_tools("qemu-img", "qemu-nbd"),
              pytest.mark.skipif(not nbdlib.available(), reason="needs python3-libnbd")]
MiB = 1 << 20
DISK = 160 * MiB
P1 = (1 * MiB, 64 * MiB)  # ext4
P2 = (66 * MiB, DISK - 66 * MiB - MiB)  # NTFS, to 1 MiB before the end


def convert(src: Path, fmt: str, dst: Path, *opts: str) -> Path:
    run("qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, str(src), str(dst))
    return dst


def as_raw(img: Path, tmp: Path) -> Path:
    out = tmp / f"{img.name}.expected.raw"
    run("qemu-img", "convert", "-O", "raw", str(img), str(out))
    return out


def identical(a: Path, b: Path) -> bool:
    p = subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True)
    assert p.returncode in (0, 1), p.stderr
    return p.returncode == 0


@contextmanager
def ntfs_mounted(dev: str, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    run("ntfs-3g", dev, str(mnt))
    try:
        yield mnt
    finally:
        umount(mnt)


def windows_disk(tmp: Path) -> Path:
    """A raw MBR disk: partition 1 ext4, partition 2 NTFS, both with files. Unused space is
    zeros, as on a fresh image."""
    raw = tmp / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(DISK)
    script = (f"label: dos\nstart={P1[0] // 512}, size={P1[1] // 512}, type=83\n"
              f"start={P2[0] // 512}, size={P2[1] // 512}, type=7\n")
    subprocess.run(["sfdisk", "-q", str(raw)], input=script, text=True, check=True, capture_output=True)
    with loop(raw, *P1) as dev:
        content = fill_tree(tmp / "linux", seed=21, files=40, max_size=2 * MiB)
        run("mkfs.ext4", "-q", "-F", "-d", str(content), dev)
        backdate_ext4(dev, content)  # written a day before the capture (tracking/volume/racy.py)
    with loop(raw, *P2) as dev:
        run("mkntfs", "-q", "-Q", "-F", "-p", str(P2[0] // 512), dev)
        with ntfs_mounted(dev, tmp / "ntfs") as mnt:
            fill_tree(mnt / "Users", seed=22, files=40, max_size=2 * MiB)
        backdate_ntfs(dev)
    return raw


@contextmanager
def writable(img: Path, fmt: str, tmp: Path) -> Iterator[Path]:
    """The image as a file, writable through qemu-nbd (-> nbdfuse): no /dev/nbd needed."""
    sock, fuse = tmp / "rw.sock", tmp / "fuse"
    fuse.mkdir(exist_ok=True)
    server = subprocess.Popen(["qemu-nbd", "-f", fmt, "-k", str(sock), str(img)])
    try:
        until(sock.exists, "qemu-nbd", server)  # not probed: without -t, qemu-nbd serves one client
        client = subprocess.Popen(["nbdfuse", str(fuse), "--unix", str(sock)])
        try:
            until((fuse / "nbd").exists, "nbdfuse", client)
            yield fuse / "nbd"
        finally:
            umount(fuse)
            client.wait(10)
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait(10)


def change_both(img: Path, fmt: str, tmp: Path) -> None:
    """Through qemu-nbd: in each partition, one file rewritten in place and one new file.
    Nothing is freed, so free space stays zeros and the restore equals the image."""
    with ExitStack() as stack:
        disk = stack.enter_context(writable(img, fmt, tmp))
        ext = stack.enter_context(mounted(stack.enter_context(loop(disk, *P1)), tmp / "m-ext4"))
        with open(ext / "d1" / "f1.bin", "r+b") as f:
            f.write(os.urandom(12_000))
        (ext / "new.bin").write_bytes(os.urandom(300_000))
        ntfs = stack.enter_context(ntfs_mounted(stack.enter_context(loop(disk, *P2)), tmp / "m-ntfs"))
        with open(ntfs / "Users" / "d2" / "f2.bin", "r+b") as f:
            f.write(os.urandom(9_000))
        (ntfs / "Users" / "report.docx").write_bytes(os.urandom(250_000))


@needs_root()
@needs_tools("sfdisk", "losetup", "mkfs.ext4", "mkntfs", "ntfs-3g", "nbdfuse", "fusermount3")
@pytest.mark.root
@pytest.mark.parametrize("fmt", ["vhdx", "vmdk"])
def test_guest_file_systems_tracked_inside_the_image(cli: Cli, tmp_path: Path, fmt: str) -> None:
    img = convert(windows_disk(tmp_path), fmt, tmp_path / f"disk.{fmt}")
    assert cli("init").returncode == 0
    r = cli("--json", "backup", "--volume", str(img))
    assert r.returncode == 0, r.stderr
    first = r.last("summary")
    assert first["source_format"] == fmt and f"({fmt} over NBD)" in first["source"]
    assert first["file_system"] == "partitions"

    change_both(img, fmt, tmp_path)
    r = cli("backup", "--volume", str(img))  # the text a person reads
    assert r.returncode == 0, r.stderr
    assert "change source: fs-digests (" in r.stdout and "passed over" not in r.stdout, r.stdout
    assert "partition 1 (ext4): " in r.stdout and "partition 2 (ntfs): " in r.stdout, r.stdout
    snap = [x for x in cli("--json", "snapshots").json if x.get("kind") == "volume"][-1]
    summary = snap["summary"]
    assert summary["change_source"] == "fs-digests" and summary["rejected"] == []
    assert summary["source_format"] == fmt
    assert [p["fs"] for p in summary["blocks"]["partitions"]] == ["ext4", "ntfs"]
    notes = summary["notes"]
    assert any(n.startswith("partition 1 (ext4): ") and n.endswith(" inodes changed") and not
               n.startswith("partition 1 (ext4): 0 of") for n in notes), notes
    assert any(n.startswith("partition 2 (ntfs): ") and n.endswith(" MFT records changed") and not
               n.startswith("partition 2 (ntfs): 0 of") for n in notes), notes
    # metadata (inode tables, journals, the MFT), the gaps between partitions and the changed
    # files: not the ~40 MiB of file data (and as much in zeros), nor free space
    assert first["bytes_read"] > 30 * MiB, first  # VMDK: the zero halves of the files are holes
    assert summary["bytes_processed"] < min(first["bytes_read"] // 3, DISK // 8), summary
    assert summary["blocks_changed"] > 0

    restored = tmp_path / "restored.raw"
    assert cli("restore", "--volume", "latest", str(restored), "--verify").returncode == 0
    assert sha256(restored) == sha256(as_raw(img, tmp_path))
    assert identical(restored, img)
    again = tmp_path / f"restored.{fmt}"
    assert cli("restore", "--volume", "latest", str(again), "--verify").returncode == 0
    assert identical(again, img)
    older = tmp_path / "first.raw"
    assert cli("restore", "--volume", first["snapshot"], str(older)).returncode == 0
    assert not identical(older, img)


def random_image(tmp: Path, fmt: str, size: int = 24 * MiB, opts: list[str] | None = None) -> tuple[Path, Path]:
    """(image, its raw content): data with holes between."""
    raw = tmp / f"{fmt}-content.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for i in range(0, size // MiB, 3):
            f.seek(i * MiB + 777)
            f.write(os.urandom(MiB - 1000))
    return convert(raw, fmt, tmp / f"disk.{fmt}", *(opts or [])), raw


@pytest.mark.parametrize("fmt", ["vhdx", "vmdk"])
def test_unaligned_reads_are_widened_to_the_servers_minimum(tmp_path: Path, fmt: str) -> None:
    """qemu-nbd asks for 512-byte aligned requests for VHDX; file-system probes read a few
    bytes at odd offsets."""
    import random

    from deltavault.tracking.volume.images import ImageAccess

    img, raw = random_image(tmp_path, fmt)
    data = raw.read_bytes()
    access = ImageAccess(str(img), fmt, probed=True)
    try:
        reader = access.open(None, "x")
        assert reader.align == (512 if fmt == "vhdx" else 1) and reader.size == len(data)
        rnd = random.Random(5)
        for _ in range(200):
            off = rnd.randrange(len(data) - 1)
            n = rnd.randrange(1, min(len(data) - off, 3 * MiB) + 1)
            buf = bytearray(n)
            reader.read_into(memoryview(buf), off)
            assert buf == data[off:off + n], (off, n)
    finally:
        access.close()


@pytest.mark.parametrize("fmt", ["vhdx", "vmdk", "vmdk-flat"])
def test_cli_restores_raw_or_in_the_original_format(cli: Cli, tmp_path: Path, fmt: str) -> None:
    """vmdk-flat: a descriptor file naming a flat extent beside it."""
    img, raw = random_image(tmp_path, fmt.split("-")[0],
                            opts=["-o", "subformat=monolithicFlat"] if fmt == "vmdk-flat" else [])
    fmt = fmt.split("-")[0]
    assert cli("init").returncode == 0
    r = cli("--json", "backup", "--volume", str(img))
    assert r.returncode == 0, r.stderr
    s = r.last("summary")
    assert s["source_format"] == fmt and s["size"] == raw.stat().st_size
    (snap,) = [x for x in cli("--json", "snapshots").json if x.get("kind") == "volume"]
    assert snap["summary"]["source_format"] == fmt

    out = tmp_path / "out.img"  # no known extension: raw
    r = cli("--json", "restore", "--volume", "latest", str(out), "--verify")
    assert r.returncode == 0, r.stderr
    assert r.last("summary")["format"] == "raw"
    assert sha256(out) == sha256(raw) and identical(out, img)

    for target, extra, want in ((tmp_path / f"copy.{fmt}", [], fmt),  # by the extension
                                (tmp_path / "orig.bin", ["--format", "original"], fmt),
                                (tmp_path / "as.qcow2", [], "qcow2"),
                                (tmp_path / "forced.vhdx", ["--format", "vmdk"], "vmdk")):
        r = cli("--json", "restore", "--volume", "latest", str(target), "--verify", *extra)
        assert r.returncode == 0, r.stderr
        assert r.last("summary")["format"] == want
        assert json.loads(run("qemu-img", "info", "--output=json", str(target)))["format"] == want
        assert identical(target, img), target
    assert sorted(p.name for p in tmp_path.iterdir() if ".dv-" in p.name) == []  # no temporary files left

    # an existing target is kept without --overwrite, replaced with it
    r = cli("--json", "restore", "--volume", "latest", str(tmp_path / f"copy.{fmt}"))
    assert r.returncode == ExitCode.USAGE and "--overwrite" in r.last("error")["message"]
    r = cli("--json", "restore", "--volume", "latest", str(tmp_path / f"copy.{fmt}"), "--overwrite")
    assert r.returncode == 0, r.stderr
    r = cli("--json", "restore", "latest", "--target", str(tmp_path / "dir"), "--format", "vhdx")
    assert r.returncode == ExitCode.USAGE and "--volume" in r.last("error")["message"]


def nbd_leftovers(image: Path, tmpdir: Path) -> list[str]:
    """qemu-nbd processes serving ``image``, and socket directories under ``tmpdir``."""
    procs = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"qemu-nbd") and str(image).encode() in cmd:
                procs.append(pid)
    return procs + [p.name for p in tmpdir.glob("dv-nbd-*")]


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
