"""Image headers shaped to make qemu spin (docs/security.md, "A VMDK shaped to take hours"):
``backup --volume`` of a small VMDK claiming a terabyte of tiny grains, its grain directory
naming one table millions of times, ends at once with the source exit code and the reason,
leaving no qemu process behind; honest large sparse images still back up and restore equal.

Each run goes through the real CLI in a process group of its own, with a deadline: past it
the whole group (deltavault and any qemu-img or qemu-nbd it started) is killed and the test
fails. Before the fix the run spun in ``qemu-img map`` for five minutes."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from deltavault.errors import ExitCode, SourceError
from deltavault.tracking.volume import nbdlib
from deltavault.tracking.volume.qemu import image_map
from tests.conftest import Cli, CliResult, needs_tools
from tests.integration.volume.conftest import sha256
from tests.integration.volume.test_volume_images import MiB, identical, nbd_leftovers

pytestmark = [needs_tools("qemu-img", "qemu-nbd"),
              pytest.mark.skipif(not nbdlib.available(), reason="needs python3-libnbd")]
TiB = 1 << 40
DEADLINE = 90  # seconds: the honest 1 TiB images take about 15 on a loaded machine


def bounded(cli: Cli, *args: str, env: dict[str, str] | None = None) -> CliResult:
    """The CLI run in a process group of its own: killed whole, and the test failed, if it
    is still running after DEADLINE seconds."""
    p = subprocess.Popen([sys.executable, "-m", "deltavault", *cli.options, *args], env={**cli.env, **(env or {})},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"deltavault {' '.join(args)} still running after {DEADLINE} s (killed)")
    return CliResult(p.returncode, out, err)


def qemu_processes(image: Path) -> list[str]:
    """qemu-img and qemu-nbd processes naming ``image``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].rsplit(b"/", 1)[-1] in (b"qemu-img", b"qemu-nbd") and str(image).encode() in b" ".join(cmd):
            found.append(pid)
    return found


def hostile_vmdk(path: Path, grain: int, capacity: int, *, compressed: bool) -> Path:
    """A VMDK sparse extent (streamOptimized if ``compressed``, else monolithicSparse) of
    ``capacity`` sectors in grains of ``grain`` sectors, its grain directory naming one
    empty grain table everywhere: 16 MiB for 1 TiB of 512-byte grains."""
    per_gt = 512
    tables = -(-capacity // (grain * per_gt))
    gd, gt = 2, 2 + -(-4 * tables // 512)
    flags = 1 | 3 << 16 if compressed else 1 | 2
    header = struct.pack("<4sIIQQQQIQQQ", b"KDMV", 3, flags, capacity, grain, 1, 1, per_gt, 0, gd, gt + 4)
    header += b"\0\n \r\n" + struct.pack("<H", 1 if compressed else 0)
    kind = b"streamOptimized" if compressed else b"monolithicSparse"
    desc = (b'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="%s"\n'
            b'RW %d SPARSE "%s"\n' % (kind, capacity, path.name.encode()))
    with open(path, "wb") as f:
        f.write(header.ljust(512, b"\0") + desc.ljust(512, b"\0"))
        f.write(struct.pack("<I", gt) * tables)
        f.truncate((gt + 5) * 512)
    return path


@pytest.mark.parametrize("grain, compressed, said", [
    (1, True, "has grains of 512 bytes; a VMDK's grain is at least 4096 bytes"),
    (1, False, "has grains of 512 bytes; a VMDK's grain is at least 4096 bytes"),
    (8, True, "claims 268435456 grains (1099511627776 bytes in grains of 4096)"),
], ids=["stream-512", "sparse-512", "stream-4k"])
def test_a_vmdk_claiming_a_terabyte_of_tiny_grains_is_refused_at_once(cli: Cli, tmp_path: Path, grain: int,
                                                                      compressed: bool, said: str) -> None:
    img = hostile_vmdk(tmp_path / "vm.vmdk", grain, 1 << 31, compressed=compressed)
    assert img.stat().st_size <= 17 * MiB
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    assert cli("init").returncode == 0
    r = bounded(cli, "--json", "backup", "--volume", str(img), env={"TMPDIR": str(tmpdir)})
    assert r.returncode == ExitCode.SOURCE, (r.stdout, r.stderr)
    error = r.last("error")["message"]
    assert f"cannot open {img} as a vmdk image" in error and said in error, error
    assert qemu_processes(img) == [] and nbd_leftovers(img, tmpdir) == []
    assert [x for x in cli("--json", "snapshots").json if x.get("kind") == "volume"] == []


def test_a_qemu_img_past_its_deadline_is_stopped_and_reaped(tmp_path: Path) -> None:
    """The bound on the qemu-img child itself: the map of the hostile extent (which spins
    for hours) is stopped at its deadline, with the reason, and nothing is left running."""
    img = hostile_vmdk(tmp_path / "vm.vmdk", 1, 1 << 31, compressed=True)
    with pytest.raises(SourceError, match=r"qemu-img map .*vm\.vmdk: did not finish within 2 s \(stopped\)"):
        image_map(str(img), "vmdk", 0, TiB, timeout=2)
    assert qemu_processes(img) == []


def sparse_raw(path: Path) -> Path:
    """1 TiB, 1 MiB of random data at four places (the first and last MiB among them)."""
    with open(path, "wb") as f:
        f.truncate(TiB)
        for off in (0, 5 << 30, 700 << 30, TiB - MiB):
            f.seek(off)
            f.write(os.urandom(MiB))
    return path


@pytest.mark.parametrize("fmt, opts", [("vmdk", ["-o", "subformat=monolithicSparse"]),
                                       ("vmdk", ["-o", "subformat=streamOptimized"]),
                                       ("qcow2", [])], ids=["vmdk-sparse", "vmdk-stream", "qcow2"])
def test_an_honest_terabyte_sparse_image_backs_up_and_restores_equal(cli: Cli, tmp_path: Path, fmt: str,
                                                                     opts: list[str]) -> None:
    raw = sparse_raw(tmp_path / "content.raw")
    img = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, str(raw), str(img)], check=True)
    assert cli("init").returncode == 0
    r = bounded(cli, "--json", "backup", "--volume", str(img))
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.last("summary")["size"] == TiB
    out = tmp_path / "back.raw"
    assert bounded(cli, "restore", "--volume", "latest", "--target", str(out)).returncode == 0
    assert identical(out, raw)
    assert qemu_processes(img) == []


def test_a_flat_extent_opening_with_a_sparse_header_is_the_guests_data(cli: Cli, tmp_path: Path) -> None:
    """A flat extent is the guest's disk, byte for byte: a guest that writes the hostile
    header into its first sector has written data, which is backed up as such."""
    raw = tmp_path / "content.raw"
    head = hostile_vmdk(tmp_path / "head.bin", 1, 1 << 31, compressed=True).read_bytes()[:4096]
    raw.write_bytes(head + os.urandom(MiB) + bytes(3 * MiB - len(head)))
    img = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
                    str(raw), str(img)], check=True)
    assert (tmp_path / "disk-flat.vmdk").read_bytes()[:4] == b"KDMV"
    assert cli("init").returncode == 0
    r = bounded(cli, "--json", "backup", "--volume", str(img))
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = tmp_path / "back.raw"
    assert bounded(cli, "restore", "--volume", "latest", "--target", str(out)).returncode == 0
    assert sha256(out) == sha256(raw)  # (qemu-img compare would probe it as a VMDK)


def footer_vmdk(path: Path) -> Path:
    """A monolithicSparse VMDK whose header is a sane 1 MiB disk of 64 KiB grains with its
    grain directory "at the end", and whose footer (which qemu then reads whole, header
    fields and all) claims 1 TiB of 512-byte grains: 17 MiB, sparse."""
    ref = path.with_name("ref.vmdk")
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(ref), "1M"], check=True)
    desc = ref.read_bytes()[512:512 * 21]  # its embedded descriptor (sectors 1 to 20)
    ref.unlink()

    def header(capacity: int, grain: int, gd: int) -> bytes:
        h = struct.pack("<4sIIQQQQIQQQ", b"KDMV", 1, 3, capacity, grain, 1, 20, 512, 0, gd, 128)
        return (h + b"\0\n \r\n").ljust(512, b"\0")

    size = 17 * MiB
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(header(2048, 128, 0xFFFFFFFFFFFFFFFF) + desc)
        f.seek(size - 1536)  # the footer: its marker, the header qemu uses, end of stream
        f.write(struct.pack("<QII", 1, 0, 3).ljust(512, b"\0") + header(1 << 31, 1, 64)
                + struct.pack("<QII", 0, 0, 0).ljust(512, b"\0"))
    return path


def test_a_vmdk_whose_footer_claims_a_terabyte_of_tiny_grains_is_refused_at_once(cli: Cli, tmp_path: Path) -> None:
    """qemu takes the whole header from the footer when the first says the grain directory
    is at the end: bounding the first header's grains alone let this one spin."""
    img = footer_vmdk(tmp_path / "vm.vmdk")
    assert cli("init").returncode == 0
    r = bounded(cli, "--json", "backup", "--volume", str(img))
    assert r.returncode == ExitCode.SOURCE, (r.stdout, r.stderr)
    assert "has grains of 512 bytes" in r.last("error")["message"]
    assert qemu_processes(img) == []


def flat_vmdk(path: Path, extents: list[int]) -> Path:
    """A monolithicFlat VMDK of one-sector extents of the file data.raw (1 MiB), at the
    sectors ``extents``."""
    (path.parent / "data.raw").write_bytes(b"\1" * MiB)
    lines = ["# Disk DescriptorFile", "version=1", "CID=12345678", "parentCID=ffffffff",
             'createType="monolithicFlat"', "", *[f'RW 1 FLAT "data.raw" {s}' for s in extents], "",
             'ddb.adapterType = "ide"']
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_vmdk_of_many_flat_extents_is_mapped_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ``qemu-img map`` opens every extent: one per extent made a descriptor of a few
    hundred lines take minutes (quadratic). One map serves them all, and still finds an
    extent whose range ends past its file's end."""
    from deltavault.tracking.volume import images
    from deltavault.tracking.volume.qemu import image_info

    calls: list[tuple[int, int]] = []

    def counted(path: str, fmt: str, start: int, length: int, **kw: float) -> list[dict[str, object]]:
        calls.append((start, length))
        return image_map(path, fmt, start, length, **kw)

    monkeypatch.setattr(images, "image_map", counted)
    img = flat_vmdk(tmp_path / "many.vmdk", list(range(400)))
    images.check_extents(str(img), image_info(str(img)))
    assert len(calls) == 1 and calls[0][0] == 0  # one map, from the first extent on
    cut = flat_vmdk(tmp_path / "cut.vmdk", [*range(300), 2047, 2048])  # the last one past the 1 MiB file
    with pytest.raises(SourceError, match=r"truncated: its extent file .*data\.raw is 1048576 bytes long"):
        images.check_extents(str(cut), image_info(str(cut)))
