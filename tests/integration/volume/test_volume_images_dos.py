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
