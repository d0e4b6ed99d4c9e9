"""Extended attributes of one entry are read up to 16 MiB together (fs.meta.INLINE_MAX), on
any file system. XFS keeps as many xattrs of up to 64 KiB as a file's owner sets (as many
as the names listxattr returns: some 9,000): a user's file with 3,000 of them (188 MiB)
was read whole by backup and by ``sync --xattrs``, and both were killed under the suite's
memory limit (tests/memlimit.py, 143 MiB). The rest is now named as a problem of that
entry, not read; the other entries are stored and synced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Cli, needs_root, needs_tools
from tests.loopdev import fresh_fs

pytestmark = [needs_root(), pytest.mark.root, needs_tools("mkfs.xfs"), pytest.mark.memory_limit]

KEPT = [f"user.x{i:04}" for i in range(256)]  # 256 x 64 KiB: 16 MiB, in name order


def _hostile_tree(root: Path) -> None:
    """data/f with 3,000 xattrs of 64 KiB; data/g with one small; data/h with more names
    than listxattr can return (64 KiB of them)."""
    d = root / "data"
    d.mkdir()
    for n in "fgh":
        (d / n).write_bytes(n.encode())
    value = os.urandom(65536)
    for i in range(3000):
        os.setxattr(d / "f", f"user.x{i:04}", value)
    os.setxattr(d / "g", "user.small", b"small")
    for i in range(6000):
        os.setxattr(d / "h", f"user.many-names-{i:05}", b"")


def _user_xattrs(path: Path) -> list[str]:
    return sorted(n for n in os.listxattr(path) if n.startswith("user."))


def test_a_backup_reads_at_most_16_mib_of_one_entrys_xattrs(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    with fresh_fs(tmp_path, "600M", "mkfs.xfs", "-q", "-f") as mnt:
        _hostile_tree(mnt)
        r = cli("--json", "backup", str(mnt / "data"))
        assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]  # partial
        problems = {p["path"].rsplit("/", 1)[-1]: p["message"] for p in r.json if p.get("type") == "problem"}
        assert set(problems) == {"f", "h"}, problems
        assert "2744 xattrs (the first: user.x0256) not read" in problems["f"] and "16 MiB" in problems["f"]
        assert "more names than listxattr returns" in problems["h"], problems["h"]
        out = mnt / "restored"
        r = cli("restore", "latest", "--target", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        got = next(out.rglob("data"))
        assert _user_xattrs(got / "f") == KEPT
        assert os.getxattr(got / "f", "user.x0255") == os.getxattr(mnt / "data" / "f", "user.x0255")
        assert _user_xattrs(got / "g") == ["user.small"] and (got / "h").read_bytes() == b"h"


def test_sync_xattrs_reads_at_most_16_mib_of_one_entrys_xattrs(tmp_path: Path, cli: Cli) -> None:
    with fresh_fs(tmp_path, "600M", "mkfs.xfs", "-q", "-f") as mnt:
        _hostile_tree(mnt)
        log = tmp_path / "sync.log"
        r = cli("--json", "sync", "--xattrs", "--log", str(log), str(mnt / "data"), str(mnt / "dst"))
        assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
        dst = mnt / "dst"
        assert _user_xattrs(dst / "f") == KEPT and (dst / "f").read_bytes() == b"f"
        assert _user_xattrs(dst / "g") == ["user.small"]
        assert _user_xattrs(dst / "h") == [] and (dst / "h").read_bytes() == b"h"
    errors = {f[5]: f[6] for f in (ln.split("\t") for ln in log.read_text().splitlines()) if f[1] == "error"}
    assert set(errors) == {"f", "h"}, errors
    assert errors["f"].startswith("metadata: 2744 xattrs (the first: user.x0256) not read: one entry's xattrs "
                                  "stop at 16 MiB together; not kept"), errors["f"]
    assert "more names than listxattr returns" in errors["h"], errors["h"]
