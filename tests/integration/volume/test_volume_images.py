"""VHDX and VMDK images: read through qemu-nbd and libnbd, guest file systems tracked by
their metadata digests per partition, restored raw or in their own format; damaged images
refused with SourceError and nothing left behind (no qemu-nbd, no socket directory)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from deltavault.errors import ExitCode
from deltavault.tracking.volume import nbdlib
from tests.conftest import Cli, needs_root, needs_tools
from tests.integration.volume.conftest import (
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
