"""serve --volume: an NBD export of a volume snapshot (qemu-nbd over the FUSE image):
qemu-img compare against the original, qemu-img convert equal to restore --volume, a
guest-style write through the overlay leaving the repository check --read-data clean,
and a port in use refused."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cli, needs_root, needs_tools
from tests.integration.mount.conftest import leftovers, serving
from tests.loopdev import run
from tests.ports import free_port

pytestmark = [needs_root(), needs_tools("fusermount3", "qemu-nbd", "qemu-img", "qemu-io"), pytest.mark.root]
MiB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def backed_up(cli: Cli, tmp_path: Path) -> Path:
    img = tmp_path / "vm.img"
    with open(img, "wb") as f:
        f.truncate(96 * MiB)
    run("mkfs.ext4", "-q", "-F", str(img))
    rnd = random.Random(4)
    with open(img, "r+b") as f:  # some data past the file system's metadata, and a hole
        for off in (20 * MiB, 33 * MiB + 4096, 70 * MiB):
            f.seek(off)
            f.write(rnd.randbytes(3 * MiB))
    assert cli("init").returncode == 0
    r = cli("backup", "--volume", str(img), "--free-space", "read")
    assert r.returncode == 0, r.stderr
    return img


def test_the_export_equals_the_image_and_converts_to_what_restore_writes(cli: Cli, tmp_path: Path,
                                                                          backed_up: Path) -> None:
    port = free_port()
    with serving(cli, "--volume", "latest", "--listen", f"127.0.0.1:{port}") as uri:
        assert uri == f"nbd://127.0.0.1:{port}"
        p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(backed_up)],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(tmp_path / "converted.img"))
        # read-only without an overlay
        p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", uri], capture_output=True, text=True)
        assert "failed" in (p.stdout + p.stderr).lower() or p.returncode != 0
    assert cli("restore", "--volume", "latest", str(tmp_path / "restored.img")).returncode == 0
    assert sha(tmp_path / "converted.img") == sha(tmp_path / "restored.img") == sha(backed_up)
    assert leftovers() == []


def test_writes_go_to_the_overlay_and_the_repository_stays_clean(cli: Cli, tmp_path: Path,
                                                                backed_up: Path) -> None:
    overlay = tmp_path / "vm-overlay.qcow2"
    sock = tmp_path / "nbd.sock"
    with serving(cli, "--volume", "latest", "--socket", str(sock), "--writable-overlay", str(overlay)) as uri:
        # what a guest does: write blocks, some over data, some over a hole, then flush
        run("qemu-io", "-f", "raw", "-c", "write -P 0xa5 1M 64k", "-c", "write -P 0x5a 50M 1M",
            "-c", "flush", uri)
        run("qemu-io", "-f", "raw", "-c", "read -P 0xa5 1M 64k", "-c", "read -P 0x5a 50M 1M", uri)
    assert overlay.exists()
    # served again with the same overlay: the writes are still there
    with serving(cli, "--volume", "latest", "--socket", str(sock), "--writable-overlay", str(overlay)) as uri:
        run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 50M 1M", uri)
    r = cli("check", "--read-data")
    assert r.returncode == 0, r.stdout + r.stderr
    assert cli("restore", "--volume", "latest", str(tmp_path / "restored.img")).returncode == 0
    assert sha(tmp_path / "restored.img") == sha(backed_up)
    assert leftovers() == []


def test_a_port_in_use_and_a_foreign_overlay_are_refused(cli: Cli, tmp_path: Path, backed_up: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("serve", "--volume", "latest", "--listen", f"127.0.0.1:{port}")
        assert r.returncode == 17 and "in use" in r.stderr, r.stderr
    other = tmp_path / "other.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(other), "96M")
    r = cli("serve", "--volume", "latest", "--listen", f"127.0.0.1:{free_port()}", "--writable-overlay", str(other))
    assert r.returncode == 2 and "not made for volume snapshot" in r.stderr, r.stderr
    r = cli("serve", "--volume", "fedcba98")
    assert r.returncode == 2 and "no snapshot matches" in r.stderr
    assert leftovers() == []
    assert not os.path.exists(tmp_path / "nbd.sock")


def test_an_overlay_another_process_holds_is_in_use_not_foreign(cli: Cli, tmp_path: Path, backed_up: Path) -> None:
    """qemu-img info of an overlay a VM (or another serve) has open fails on its lock: that
    had been called an overlay "not made for volume snapshot ..." (exit 2)."""
    overlay = tmp_path / "vm-overlay.qcow2"
    with serving(cli, "--volume", "latest", "--socket", str(tmp_path / "nbd.sock"), "--writable-overlay",
                 str(overlay)):
        pass
    spec = (f"driver=qcow2,file.driver=file,file.filename={overlay},"
            f"backing.driver=raw,backing.file.driver=file,backing.file.filename={backed_up}")
    holder = subprocess.Popen(["qemu-io", "--image-opts", spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:  # its answer to a read says it holds the overlay (write lock), as a VM would
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(b"read 0 512\n")
        holder.stdin.flush()
        assert b"read 512/512 bytes" in holder.stdout.readline()
        r = cli("serve", "--volume", "latest", "--listen", f"127.0.0.1:{free_port()}",
                "--writable-overlay", str(overlay))
    finally:
        holder.communicate(b"quit\n", timeout=30)
    assert r.returncode == 17 and "in use" in r.stderr and "not made for" not in r.stderr, r.stderr
    assert leftovers() == []
