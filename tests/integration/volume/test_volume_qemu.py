"""qcow2 images with persistent dirty bitmaps, exported by qemu-nbd and read with libnbd."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deltavault.backup.volume.options import VolumeRequest
from deltavault.backup.volume.run import VolumeBackup
from deltavault.backup.volume.state import LocalState
from deltavault.progress import NullReporter
from deltavault.tracking.volume import nbdlib
from deltavault.tracking.volume.qemu import bitmaps, image_info
from tests.conftest import needs_root, needs_tools
from tests.integration.volume.conftest import (
    Vol,
    ext4_free_blocks,
    fill_tree,
    fsck_clean,
    loop,
    make_ext4,
    mounted,
    run,
    sha256,
    sha256_free_zeroed,
    umount,
)
from tests.waits import unix_listening, until

pytestmark = [needs_tools("qemu-img", "qemu-nbd", "qemu-io"),
              pytest.mark.skipif(not nbdlib.available(), reason="needs python3-libnbd")]
MiB = 1 << 20


def names(img: Path) -> set[str]:
    return set(bitmaps(image_info(str(img))))


def raw_sha256(img: Path, tmp: Path) -> str:
    raw = tmp / "expected.raw"
    run("qemu-img", "convert", "-O", "raw", str(img), str(raw))
    h = sha256(raw)
    raw.unlink()
    return h


def qemu_io(img: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(*args, str(img))


def make_qcow2(tmp: Path, size_mb: int = 64) -> Path:
    raw = tmp / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(size_mb * MiB)
        for i in range(0, size_mb, 5):  # some data, some holes
            f.seek(i * MiB)
            f.write(os.urandom(MiB))
    img = tmp / "disk.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(raw), str(img))
    raw.unlink()
    return img


@contextmanager
def nbd_rw(img: Path, tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = tmp / "rw.sock"
    p = subprocess.Popen(["qemu-nbd", "-t", "-f", "qcow2", "-k", str(sock), str(img)])
    try:
        until(unix_listening(sock), "qemu-nbd", p)
        yield p, sock
    finally:
        if p.poll() is None:
            p.terminate()
            p.wait(10)


def nbd_write(sock: Path, writes: list[tuple[int, bytes]]) -> None:
    nbd = nbdlib.load_nbd()
    h = nbd.NBD()
    h.connect_unix(str(sock))
    for off, data in writes:
        h.pwrite(data, off)
    h.flush()
    h.shutdown()


def test_bitmap_incremental_reads_only_dirty(vol: Vol, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path)
    first = vol.backup(img)
    assert first.report.change_source == "block-digests"
    assert [x["source"] for x in first.report.rejected] == ["qemu-bitmap", "fs-digests"]
    (b1,) = names(img)
    assert b1.startswith("dv-")
    qemu_io(img, "write -P 0x5a 3M 64k", "write -P 0x11 20M 8k", "write -z 40M 1M", "write -P 0x77 63M 1M")
    second = vol.backup(img)
    rep = second.report
    assert rep.change_source == "qemu-bitmap", rep.rejected
    assert rep.bytes_dirty is not None and rep.bytes_dirty > 0
    assert rep.bytes_read <= 1.1 * rep.bytes_dirty
    assert rep.bytes_read < 4 * MiB
    # The old bitmap went once the snapshot was saved; the new one records from here on.
    (b2,) = names(img)
    assert b2 != b1
    assert sha256(vol.restore(second.snapshot_id)) == raw_sha256(img, tmp_path)
    assert sha256(vol.restore(first.snapshot_id)) != raw_sha256(img, tmp_path)


def test_inconsistent_and_missing_bitmaps_fall_back(vol: Vol, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path)
    vol.backup(img)
    # A writer that dies without closing the image leaves the bitmap flagged in-use.
    with nbd_rw(img, tmp_path) as (proc, sock):
        nbd_write(sock, [(7 * MiB, os.urandom(4096)), (30 * MiB, os.urandom(70_000))])
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (old,) = names(img)
    assert "in-use" in bitmaps(image_info(str(img)))[old]["flags"]
    r = vol.backup(img)
    assert r.report.change_source == "block-digests"
    assert "inconsistent" in r.report.rejected[0]["reason"]
    assert sha256(vol.restore(r.snapshot_id)) == raw_sha256(img, tmp_path)
    assert old not in names(img) and len(names(img)) == 1
    # The bitmap this run added works next time.
    qemu_io(img, "write -P 0x42 9M 4k")
    r2 = vol.backup(img)
    assert r2.report.change_source == "qemu-bitmap"
    (cur,) = names(img)
    run("qemu-img", "bitmap", "--remove", str(img), cur)
    qemu_io(img, "write -P 0x43 10M 4k")
    r3 = vol.backup(img)
    assert r3.report.change_source == "block-digests"
    assert "missing" in r3.report.rejected[0]["reason"]
    assert sha256(vol.restore(r3.snapshot_id)) == raw_sha256(img, tmp_path)


class _Crash(Exception):
    pass


class _CrashingReporter(NullReporter):
    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
        raise _Crash


def test_rotation_never_loses_a_write(vol: Vol, tmp_path: Path) -> None:
    """A run that fails after adding its bitmap removes it and keeps the old one; a run
    that was killed leaves both, and the next run reads the old one (a superset)."""
    img = make_qcow2(tmp_path)
    vol.backup(img)
    (b1,) = names(img)
    qemu_io(img, "write -P 0x21 2M 4k")
    req = VolumeRequest(str(img), source_id="test-volume")
    with pytest.raises(_Crash):
        VolumeBackup(vol.repo, req, _CrashingReporter()).run()
    assert names(img) == {b1}
    # A killed run: its bitmap stays (recorded as pending) and keeps recording.
    state = LocalState.load(vol.repo.cache_dir, "test-volume", key=vol.repo.cache_key("volume state"))
    state.add_pending("qemu-bitmap", "dv-killedrun00000", str(img))
    run("qemu-img", "bitmap", "--add", str(img), "dv-killedrun00000")
    qemu_io(img, "write -P 0x22 12M 4k")
    r = vol.backup(img)
    assert r.report.change_source == "qemu-bitmap"
    assert r.report.bytes_dirty == 2 * 65536  # both writes, each one 64 KiB bitmap granule
    assert sha256(vol.restore(r.snapshot_id)) == raw_sha256(img, tmp_path)
    assert len(names(img)) == 1 and not names(img) & {b1, "dv-killedrun00000"}


@needs_root()
@needs_tools("nbdfuse", "fusermount3", "losetup", "mke2fs")
@pytest.mark.root
def test_real_file_system_writes_through_qemu(vol: Vol, tmp_path: Path) -> None:
    """ext4 inside a qcow2, changed through a real mount: qemu-nbd -> nbdfuse -> loop."""
    raw = make_ext4(tmp_path / "fs.raw", 128, fill_tree(tmp_path / "src", seed=11, files=30))
    img = tmp_path / "fs.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(raw), str(img))
    first = vol.backup(img)
    assert first.report.file_system == "ext4"
    fuse = tmp_path / "fuse"
    fuse.mkdir()
    with nbd_rw(img, tmp_path) as (_proc, sock):
        fp = subprocess.Popen(["nbdfuse", str(fuse), "--unix", str(sock)])
        try:
            until((fuse / "nbd").exists, "nbdfuse", fp)
            with loop(fuse / "nbd") as dev, mounted(dev, tmp_path / "m") as mnt:
                (mnt / "big.bin").write_bytes(os.urandom(6 * MiB))
                with open(mnt / "d0" / "f0.bin", "r+b") as f:
                    f.write(os.urandom(10_000))
                for p in list((mnt / "d1").iterdir())[:3]:
                    p.unlink()
        finally:
            umount(fuse)
            fp.wait(10)
    second = vol.backup(img)
    rep = second.report
    assert rep.change_source == "qemu-bitmap", rep.rejected
    assert rep.bytes_dirty is not None and rep.bytes_read <= 1.1 * rep.bytes_dirty
    run("qemu-img", "convert", "-O", "raw", str(img), str(tmp_path / "now.raw"))
    bs, free = ext4_free_blocks(tmp_path / "now.raw")
    expected = sha256_free_zeroed(tmp_path / "now.raw", 128 * MiB, bs, free)
    restored = vol.restore(second.snapshot_id)
    assert sha256(restored) == expected
    fsck_clean(restored)


def test_switching_away_from_bitmaps_removes_the_last_one(vol: Vol, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path)
    vol.backup(img, cbt="qemu")
    (b1,) = names(img)
    qemu_io(img, "write -P 0x5a 3M 64k")
    r = vol.backup(img, cbt="digests")
    assert r.report.change_source == "block-digests"
    assert not names(img)  # it would only go on recording writes nobody reads
    assert sha256(vol.restore(r.snapshot_id)) == raw_sha256(img, tmp_path)
    # back to bitmaps: one run without a usable bitmap, then incrementals again
    again = vol.backup(img, cbt="qemu")
    assert again.report.change_source == "block-digests"
    qemu_io(img, "write -P 0x11 20M 8k")
    last = vol.backup(img, cbt="qemu")
    assert last.report.change_source == "qemu-bitmap"
    assert len(names(img)) == 1 and b1 not in names(img)
    assert sha256(vol.restore(last.snapshot_id)) == raw_sha256(img, tmp_path)
