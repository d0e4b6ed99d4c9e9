"""The volume round trip every remote backend runs: the volume engine needs nothing of the
backend but the object store."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests.conftest import Cli


def volume_round_trip(cli: Cli, tmp_path: Path) -> None:
    """An ext4 image built without mounting, backed up twice and restored sha256-equal; the
    incremental takes the parent's digests from the local cache, not the repository."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(20):
        (tree / f"f{i}").write_bytes(os.urandom(200_000))
    img = tmp_path / "disk.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(img), "32M"], check=True)
    assert cli("init").returncode == 0
    assert cli("backup", "--volume", str(img), "--free-space", "read").returncode == 0
    with open(img, "r+b") as f:  # a raw change the file system does not know of
        f.seek(20 << 20)
        f.write(b"raw bytes")
    r = cli("--json", "backup", "--volume", str(img), "--free-space", "read")
    assert r.returncode == 0, r.stderr
    s = r.last("summary")
    assert s["bytes_downloaded"] < 4096, s
    out = tmp_path / "out.img"
    r = cli("restore", "--volume", "latest", str(out), "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(img.read_bytes()).digest()
