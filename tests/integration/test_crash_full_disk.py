"""Prune on a full repository disk: repacking runs out of space, prune stops with exit 14,
nothing is deleted, and every snapshot still restores; with room again it completes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli, init_small_packs, needs_root, needs_tools
from tests.loopdev import fresh_fs

# deltavault's processes run under the documented memory limit (tests/memlimit.py).
pytestmark = pytest.mark.memory_limit


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    with fresh_fs(tmp_path, "48M", "mkfs.ext4", "-q", "-F", "-m", "0") as mnt:
        yield mnt


@needs_root()
@needs_tools("mkfs.ext4", "losetup")
def test_prune_on_a_full_disk_deletes_nothing_and_keeps_every_snapshot(tmp_path: Path, cli: Cli,
                                                                         tiny_fs: Path) -> None:
    env = {"DELTAVAULT_REPOSITORY": str(tiny_fs / "repo")}
    init_small_packs(tiny_fs / "repo", cli.password_file)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(24):
        (src / f"f{i:02d}").write_bytes(os.urandom(300_000))
    r1 = cli("--json", "backup", str(src), env=env)
    assert r1.returncode == 0, r1.stderr
    first = r1.last("summary")["snapshot"]
    for i in range(0, 24, 2):
        (src / f"f{i:02d}").unlink()  # half of every pack becomes garbage once 'first' is forgotten
    r2 = cli("--json", "backup", str(src), env=env)
    assert r2.returncode == 0
    kept = digest(src)
    assert cli("forget", first, env=env).returncode == 0
    st = os.statvfs(tiny_fs)
    filler = tiny_fs / "filler"
    with filler.open("wb") as f:  # leave ~300 KB: not enough for one repacked pack
        f.write(b"\0" * (st.f_bavail * st.f_frsize - 300_000))
    before = sorted(p.relative_to(tiny_fs).as_posix() for p in (tiny_fs / "repo").rglob("*")
                    if p.is_file() and "locks" not in p.parts)
    r = cli("--json", "prune", env=env)
    assert r.returncode == 14, r.stdout + r.stderr
    assert "no space" in r.last("error")["message"]
    after = sorted(p.relative_to(tiny_fs).as_posix() for p in (tiny_fs / "repo").rglob("*")
                   if p.is_file() and "locks" not in p.parts)
    assert set(before) <= set(after), "prune deleted something although it failed"
    assert cli("check", "--read-data", env=env).returncode == 0
    out = tmp_path / "out"
    assert cli("restore", "latest", "--target", str(out), env=env).returncode == 0
    assert digest(out / "src") == kept
    filler.unlink()
    r = cli("--json", "prune", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.last("prune_summary")["packs_deleted"] >= 3
    c = cli("check", "--read-data", env=env)
    assert c.returncode == 0, c.stdout
    out2 = tmp_path / "out2"
    assert cli("restore", "latest", "--target", str(out2), env=env).returncode == 0
    assert digest(out2 / "src") == kept
