"""Sync from a btrfs snapshot on a loop device: point-in-time content, always removed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from deltavault.errors import SnapshotError
from deltavault.snapshot import take_snapshot
from deltavault.sync.local.engine import Syncer
from deltavault.sync.options import SyncOptions
from tests.conftest import needs_root, needs_tools
from tests.integration.sync.conftest import dv, nothing_to_do, summary, write

pytestmark = [needs_root(), needs_tools("mkfs.btrfs", "btrfs"), pytest.mark.root]


def subvolumes(mnt: Path) -> list[str]:
    out = subprocess.run(["btrfs", "subvolume", "list", str(mnt)], capture_output=True, text=True, check=True)
    return [ln.split(" path ")[-1] for ln in out.stdout.splitlines()]


def test_cli_sync_from_btrfs_snapshot(tmp_path: Path, btrfs_src: tuple[Path, Path]) -> None:
    mnt, src = btrfs_src
    dst = tmp_path / "dst"
    p = dv("--json", "sync", "--snapshot", "btrfs", "--xattrs", str(src / "docs"), str(dst))
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary(p)
    assert s["snapshot"]["kind"] == "btrfs" and "/data/.deltavault-snapshots/" in s["snapshot"]["mount_path"]
    assert s["snapshot"]["source_path"].endswith("/docs")
    assert nothing_to_do(src / "docs", dst, "-X") == ""
    assert subvolumes(mnt) == ["data"]  # the snapshot is gone
    assert not (src / ".deltavault-snapshots").exists()
    p = dv("--json", "sync", "--snapshot", "auto", str(src), str(tmp_path / "dst2"))
    assert summary(p)["snapshot"]["kind"] == "btrfs" and p.returncode == 0
    assert not (tmp_path / "dst2/.deltavault-snapshots").exists()
    assert subvolumes(mnt) == ["data"]


def test_snapshot_is_point_in_time_and_removed_on_interrupt(tmp_path: Path,
                                                            btrfs_src: tuple[Path, Path]) -> None:
    mnt, src = btrfs_src
    dst = tmp_path / "dst"
    with take_snapshot(str(src), "btrfs") as snap:
        assert snap.original_path == str(src) and snap.kind == "btrfs"
        write(src / "docs/a.txt", b"version 2, written during the sync")
        write(src / "docs/new.txt", b"not in the snapshot")
        r = Syncer(snap.source_path, dst, SyncOptions()).run()
        assert not r.problems
    assert (dst / "docs/a.txt").read_bytes() == b"version 1" and not (dst / "docs/new.txt").exists()
    assert subvolumes(mnt) == ["data"]

    class Stop:
        wants_totals = False

        def start(self, *a: object, **k: object) -> None: ...
        def set_totals(self, **k: object) -> None: ...
        def problem(self, *a: object) -> None: ...
        def finish(self) -> None: ...

        def advance(self, **k: object) -> None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), take_snapshot(str(src), "btrfs") as snap:
        Syncer(snap.source_path, tmp_path / "dst3", SyncOptions(), reporter=Stop()).run()  # type: ignore[arg-type]
    assert subvolumes(mnt) == ["data"] and not (src / ".deltavault-snapshots").exists()


def test_btrfs_snapshot_of_a_non_btrfs_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="not btrfs"), take_snapshot(str(tmp_path), "btrfs"):
        pass
    p = dv("sync", "--snapshot", "btrfs", str(tmp_path), str(tmp_path.parent / "elsewhere"))
    assert p.returncode == 16 and "not btrfs" in p.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_during_cli_sync_removes_the_snapshot(tmp_path: Path, btrfs_src: tuple[Path, Path],
                                                     sig: str) -> None:
    import signal
    import sys
    import time

    mnt, src = btrfs_src
    for i in range(3000):
        write(src / f"many/{i % 30}/{i}", os.urandom(2000))
    for i in range(2):  # enough work (copied, then read back by --verify) to be interrupted in
        write(src / f"big/{i}", os.urandom(32 << 20))
    snapdir = src / ".deltavault-snapshots"
    proc = subprocess.Popen([sys.executable, "-m", "deltavault", "sync", "--verify", "--snapshot", "btrfs",
                             str(src), str(tmp_path / "dst")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (snapdir.exists() and any(snapdir.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "the sync ended before its snapshot appeared"
        time.sleep(0.001)
    time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert b"interrupted" in err
    assert subvolumes(mnt) == ["data"] and not snapdir.exists()
    assert not [p for p in (tmp_path / "dst").rglob("*") if ".dv-sync-" in p.name]
