"""The real CLI: backup --volume / restore --volume, JSON reports, exit codes for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.sparse_memory import build_sparse, run_measured

from deltavault.errors import ExitCode
from tests.conftest import Cli, needs_root, needs_tools
from tests.integration.volume.conftest import sha256
from tests.loopdev import fresh_fs


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_volume_backup_restore_report_and_check(cli: Cli, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(3 << 20) + bytes(1 << 20))
    assert cli("init").returncode == 0
    r = cli("--json", "backup", "--volume", str(img), "--block-size", "256K", "--report",
            str(tmp_path / "rep.json"))
    assert r.returncode == 0, r.stderr
    s = r.last("summary")
    assert s["kind"] == "volume" and s["change_source"] == "block-digests"
    assert s["block_size"] == 256 * 1024 and s["bytes_read"] >= 3 << 20
    assert json.loads((tmp_path / "rep.json").read_text())["snapshot"] == s["snapshot"]
    assert len(s["report_files"]) == 2  # --report and the copy in the cache
    with open(img, "r+b") as f:
        f.seek(5000)
        f.write(b"changed")
    r = cli("--json", "backup", "--volume", str(img), "--block-size", "256K")
    s2 = r.last("summary")
    assert s2["parent"] == s["snapshot"] and s2["pages_changed"] == 1
    text = cli("backup", "--volume", str(img), "--block-size", "256K")
    assert "change source: block-digests" in text.stdout and "blocks:  0 of 16 changed" in text.stdout
    out = tmp_path / "out.img"
    r = cli("--json", "restore", "--volume", s2["snapshot"], str(out), "--verify")
    assert r.returncode == 0, r.stderr
    assert r.last("summary")["pages_mismatched"] == 0
    assert sha(out) == hashlib.sha256(img.read_bytes()).hexdigest()
    c = cli("--json", "check", "--read-data")
    assert c.returncode == 0, c.stdout
    assert c.last("check_summary")["errors"] == 0
    snaps = cli("--json", "snapshots")
    assert snaps.returncode == 0


def test_bad_input_exit_codes(cli: Cli, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    cli("init")
    cases = [
        (["backup", "--volume", str(img), str(img)], "exactly one"),
        (["backup", "--volume", str(tmp_path / "missing.img")], "does not exist"),
        (["backup", "--volume", str(img), "--block-size", "3K"], "power of two"),
        (["backup", "--volume", str(img), "--block-size", "8M"], "power of two"),
        (["backup", "--volume", str(img), "--cbt", "qemu"], "qcow2"),
        (["backup", "--volume", str(img), "--verify-cbt", "-1"], "--verify-cbt"),
    ]
    for args, message in cases:
        r = cli("--json", *args)
        assert r.returncode == ExitCode.USAGE, (args, r.stdout, r.stderr)
        assert message in r.last("error")["message"], (args, r.stdout)
    assert cli("backup", "--volume", str(img)).returncode == 0
    out = tmp_path / "exists.img"
    out.write_bytes(b"keep me")
    r = cli("--json", "restore", "--volume", "latest", str(out))
    assert r.returncode == ExitCode.USAGE and "--overwrite" in r.last("error")["message"]
    assert out.read_bytes() == b"keep me"
    assert cli("restore", "--volume", "latest", str(out), "--overwrite").returncode == 0
    assert sha(out) == sha(img)
    r = cli("--json", "restore", "--volume", "latest")
    assert r.returncode == ExitCode.USAGE and "TARGET" in r.last("error")["message"]
    # A files snapshot is not a volume, and a volume snapshot is not a tree.
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a").write_text("x")
    files = cli("--json", "backup", str(tmp_path / "tree")).last("summary")["snapshot"]
    r = cli("--json", "restore", "--volume", files, str(tmp_path / "v.img"))
    assert r.returncode == ExitCode.USAGE and "without --volume" in r.last("error")["message"]
    vol_snap = [s for s in cli("--json", "snapshots").json if s.get("kind") == "volume"]
    assert vol_snap
    r = cli("--json", "restore", vol_snap[0]["id"], "-t", str(tmp_path / "t"))
    assert r.returncode == ExitCode.USAGE and "restore --volume" in r.last("error")["message"]
    r = cli("--json", "restore", files, str(tmp_path / "stray"), "-t", str(tmp_path / "t"))
    assert r.returncode == ExitCode.USAGE and "--volume" in r.last("error")["message"]
    # targets that cannot be made: a precise error, exit 17, not an internal error
    for target in (out / "img", tmp_path / "no" / "such" / "dir" / "img"):
        r = cli("--json", "restore", "--volume", vol_snap[0]["id"], str(target))
        assert r.returncode == ExitCode.TARGET, (target, r.stdout, r.stderr)
        assert str(target.parent) in r.last("error")["message"]


@needs_root()
@needs_tools("mount")
def test_restore_to_a_full_disk_leaves_no_partial_image(cli: Cli, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(3 << 20))
    assert cli("init").returncode == 0
    assert cli("backup", "--volume", str(img)).returncode == 0
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        r = cli("--json", "restore", "--volume", "latest", str(small / "out.img"))
        assert r.returncode == ExitCode.NO_SPACE, (r.stdout, r.stderr)
        assert "full" in r.last("error")["message"]
        assert list(small.iterdir()) == []  # the partial image is removed
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_forget_and_prune_keep_what_volume_snapshots_use(cli: Cli, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(2 << 20) + bytes(2 << 20))
    cli("init")
    for i in range(3):
        with open(img, "r+b") as f:
            f.seek(i * 700_000)
            f.write(os.urandom(300_000))
        assert cli("backup", "--volume", str(img), "--block-size", "64K").returncode == 0
    assert cli("forget", "--keep-last", "1").returncode == 0
    p = cli("prune")
    assert p.returncode == 0, p.stdout + p.stderr
    c = cli("--json", "check", "--read-data")
    assert c.returncode == 0 and c.last("check_summary")["errors"] == 0, c.stdout
    out = tmp_path / "out.img"
    assert cli("restore", "--volume", "latest", str(out), "--verify").returncode == 0
    assert sha(out) == sha(img)


def test_latest_means_the_newest_snapshot_of_the_kind_restored(cli: Cli, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "b").write_text("y")
    assert cli("init").returncode == 0
    assert cli("backup", "--volume", str(img)).returncode == 0
    assert cli("backup", str(tree)).returncode == 0
    assert cli("backup", str(other)).returncode == 0  # newest of all
    r = cli("restore", "--volume", "latest", str(tmp_path / "v.img"))
    assert r.returncode == 0, r.stderr
    assert sha(tmp_path / "v.img") == sha(img)
    assert cli("restore", "latest", "-t", str(tmp_path / "t1")).returncode == 0
    assert (tmp_path / "t1" / "other" / "b").read_text() == "y"
    assert cli("restore", f"latest:{tree}", "-t", str(tmp_path / "t2")).returncode == 0
    assert (tmp_path / "t2" / "tree" / "a").read_text() == "x"
    r = cli("restore", f"latest:{tmp_path / 'nothing'}", "-t", str(tmp_path / "t3"))
    assert r.returncode == 2 and "no files snapshot of" in r.stderr


@needs_root()
@needs_tools("mkfs.xfs")
def test_a_volume_over_16_tib_is_refused_with_a_source_error(cli: Cli, tmp_path: Path) -> None:
    """On xfs (ext4 caps a file at 16 TiB): one page past the limit, data at its very end."""
    assert cli("init").returncode == 0
    with fresh_fs(tmp_path, "300M", "mkfs.xfs", "-q", "-f") as mnt:
        img = mnt / "big.img"
        size = (1 << 44) + 4096
        with open(img, "wb") as f:
            f.truncate(size)
            f.seek(size - 4096)
            f.write(os.urandom(4096))
        r = cli("--json", "backup", "--volume", str(img))
        assert r.returncode == ExitCode.SOURCE, (r.stdout, r.stderr)
        msg = r.last("error")["message"]
        assert str(size) in msg and "16 TiB" in msg
    assert [s for s in cli("--json", "snapshots").json if s.get("kind") == "volume"] == []


def test_a_volume_restore_reads_ahead_a_bounded_number_of_segments(cli: Cli, tmp_path: Path) -> None:
    """1 GiB of data in 16 islands: the restore's peak RSS stays near workers + 1 segments
    (64 MiB each) whatever the data. Fetching every segment ahead peaked at 1,088 MiB here."""
    img = tmp_path / "disk.img"
    build_sparse(img, 4 << 30, [(i << 28, 64 << 20) for i in range(16)])
    assert cli("init").returncode == 0
    assert cli("backup", "--volume", str(img)).returncode == 0
    out = tmp_path / "out.img"
    m = run_measured([sys.executable, "-m", "deltavault", "restore", "--volume", "latest", str(out)], cli.env)
    assert m.returncode == 0, m.stderr
    assert m.peak_total < 330 << 20, m.peak_total / 2**20
    assert sha256(out) == sha256(img)
