"""What deltavault mount refuses, and how: a missing or busy mount point, a machine without
FUSE, an unknown snapshot; and names a tampered repository plants, refused exactly as
restore refuses them."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from deltavault.backends.local import LocalBackend
from deltavault.errors import TargetError
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository
from deltavault.restore.mount.session import check_mount_point
from deltavault.testing.hostile import NOBODY
from tests.conftest import FAST_SCRYPT, PASSWORD, Cli, needs_root, needs_tools
from tests.integration.mount.conftest import _mounted, mounted

pytestmark = [needs_root(), needs_tools("fusermount3", "unshare"), pytest.mark.root]


def _backed_up(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0


def test_a_missing_or_busy_mount_point_and_an_unknown_snapshot(cli: Cli, tmp_path: Path) -> None:
    _backed_up(cli, tmp_path)
    r = cli("mount", str(tmp_path / "nowhere"))
    assert r.returncode == 17 and "does not exist" in r.stderr, r.stderr
    (tmp_path / "file").write_bytes(b"")
    r = cli("mount", str(tmp_path / "file"))
    assert r.returncode == 17 and "not a directory" in r.stderr, r.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(busy)], check=True)
    try:
        r = cli("mount", str(busy))
        assert r.returncode == 17 and "busy" in r.stderr, r.stderr
    finally:
        subprocess.run(["umount", str(busy)], check=True)
    with mounted(cli, tmp_path / "mnt"):  # our own mount is busy too
        r = cli("mount", str(tmp_path / "mnt"))
        assert r.returncode == 17 and "busy" in r.stderr, r.stderr
    r = cli("mount", str(busy), "--snapshot", "abcdef99")
    assert r.returncode == 2 and "no snapshot matches 'abcdef99'" in r.stderr, r.stderr
    assert not _mounted(busy)


def test_a_mount_point_through_a_symlink_of_another_user_is_refused(cli: Cli, tmp_path: Path,
                                                                     shared_dir: Path) -> None:
    """The mount point was stat-ed and resolved by path: a symlink nobody made in their home
    (``mnt -> a directory of root's``) had root's mount hide that directory under the
    snapshot. Refused now (exit 17), nothing mounted; root's own symlink is followed and
    the mount point given without it."""
    _backed_up(cli, tmp_path)
    precious, home = shared_dir / "precious", shared_dir / "home"
    precious.mkdir()
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    os.symlink(precious, home / "mnt")
    os.lchown(home / "mnt", NOBODY, NOBODY)
    with pytest.raises(TargetError, match=r"a symlink of another user \(uid 65534\)"):
        check_mount_point(str(home / "mnt"))
    r = cli("mount", str(home / "mnt"), timeout=120)
    assert r.returncode == 17 and "a symlink of another user (uid 65534)" in r.stderr, r.stderr
    assert not _mounted(precious)
    (shared_dir / "ours").symlink_to(precious)
    assert check_mount_point(str(shared_dir / "ours")) == str(precious)


def test_no_fuse_on_this_machine(cli: Cli, tmp_path: Path) -> None:
    """/dev/fuse hidden in a mount namespace of its own, as in a container without it."""
    _backed_up(cli, tmp_path)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "not-fuse").write_bytes(b"")
    script = (f"mount --bind {tmp_path / 'not-fuse'} /dev/fuse && "
              f"exec {sys.executable} -m deltavault mount {tmp_path / 'mnt'}")
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=cli.env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 18, p.stdout + p.stderr
    assert "FUSE is not available" in p.stderr and "/dev/fuse" in p.stderr


def test_names_a_tampered_repository_plants_are_refused_as_restore_refuses_them(cli: Cli, tmp_path: Path) -> None:
    backend = LocalBackend(cli.repo, fsync=False)
    repo = Repository.init(backend, PASSWORD, scrypt=FAST_SCRYPT, cache_root=cli.cache)
    for i, bad in enumerate(([b"..", b"x"], [b"same", b"same"], [b"a/b"], [b"fine", b"also-fine"])):
        nodes = [Node(name=n, type=NodeType.FIFO, mode=0o644) for n in bad]
        tid, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(nodes)))
        root, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(
            Tree([Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=tid)])))
        repo.flush()
        repo.save_snapshot(Snapshot(time="2026-01-01T00:00:00Z", time_ns=(i + 1) * 10**9, hostname="h",
                                    paths=["/src"], source_id="h:/src", tree=root))
    repo.flush()
    # host names and paths are names too
    repo.save_snapshot(Snapshot(time="2026-01-01T00:00:00Z", time_ns=9 * 10**9, hostname="../../etc",
                                paths=["/x"], source_id="e", tree=root))
    repo.save_snapshot(Snapshot(time="2026-01-01T00:00:00Z", time_ns=8 * 10**9, hostname="h",
                                paths=["/a/../../b"], source_id="e", tree=root))
    with mounted(cli, tmp_path / "mnt") as mnt:
        snaps = sorted(n for n in os.listdir(mnt / "snapshots") if n != "latest")
        assert len(snaps) == 6
        refused = []
        for name in snaps:
            try:
                listing = os.listdir(mnt / "snapshots" / name / "src")
            except OSError as exc:
                assert exc.errno == errno.EIO
                refused.append(name)
            else:
                assert sorted(listing) == ["also-fine", "fine"]
        assert len(refused) == 3
        assert sorted(os.listdir(mnt / "by-host")) == ["h"]
        assert sorted(os.listdir(mnt / "by-host" / "h")) == ["src"]
    # restore refuses the same three listings
    for name in refused:
        r = cli("--json", "restore", name.rsplit("_", 1)[1], "--target", str(tmp_path / name))
        assert r.returncode == 13, r.stdout + r.stderr
        assert any(p["kind"] == "corrupt" for p in r.last("summary")["problems"])
