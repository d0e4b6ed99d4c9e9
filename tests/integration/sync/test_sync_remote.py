"""Push sync to another host: the real CLI, through the real OpenSSH client, to a real sshd
on 127.0.0.1 that runs the agent (deltavault sync-agent). Checked with rsync -n --checksum,
getfacl, getfattr and stat, as the local sync is."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltavault.errors import UsageError
from deltavault.sync.ssh import RemotePath, parse_remote
from tests.conftest import needs_root, needs_tools
from tests.integration.sync.conftest import (
    REMOTE,
    dv,
    growing,
    nothing_to_do,
    summary,
    unreadable_tree,
    write,
)
from tests.integration.sync.test_sync_tree import make_tree, stat_map, tool
from tests.sshd import Server, missing_tools, sshd

pytestmark = [needs_root(), needs_tools("rsync", "getfacl", "setfacl", "getfattr"), pytest.mark.root,
              pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")]

NO_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search",
          "--inh-caps=-dac_override,-dac_read_search")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with sshd(tmp_path) as srv:
        yield srv


def push(server: Server, src: Path, dst: str | Path, *flags: str, prefix: tuple[str, ...] = (),
         remote: str = REMOTE) -> subprocess.CompletedProcess[str]:
    return dv("--json", "sync", "--remote-command", remote, *flags, str(src), f"dvtest:{dst}",
              env={"DELTAVAULT_SSH_CONFIG": str(server.ssh_config)}, prefix=prefix)


def pull(server: Server, src: str | Path, dst: Path, *flags: str,
         remote: str = REMOTE) -> subprocess.CompletedProcess[str]:
    return dv("--json", "sync", "--remote-command", remote, *flags, f"dvtest:{src}", str(dst),
              env={"DELTAVAULT_SSH_CONFIG": str(server.ssh_config)})


def temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".dv-sync-" in p.name]


def test_remote_locations() -> None:
    assert parse_remote("/srv/data") is None and parse_remote("./a:b") is None and parse_remote("rel/a:b") is None
    assert parse_remote("host:/srv/m") == RemotePath("host", "/srv/m")
    assert parse_remote("bob@host:mirror") == RemotePath("bob@host", "mirror")
    assert parse_remote("host:") == RemotePath("host", ".")
    assert parse_remote("ssh://bob@host:2222/srv/m") == RemotePath("bob@host", "/srv/m", 2222)
    assert parse_remote("ssh://host/~/m") == RemotePath("host", "m")
    for bad in ("ssh://host", "ssh://host/", "ssh://host:x/p", "@host:p", "bob@:p"):
        with pytest.raises(UsageError):
            parse_remote(bad)


def assert_mirror(src: Path, dst: Path, s: dict, log: Path) -> None:
    """A first sync of make_tree's tree kept everything, as real tools and stat see it."""
    assert s["errors"] == 0 and s["hardlinks"] == 2 and s["symlinks"] == 4 and s["special"] == 2
    assert nothing_to_do(src, dst, "-A", "-X", "-D") == ""
    assert tool("getfacl", "-R", "-p", ".", cwd=src) == tool("getfacl", "-R", "-p", ".", cwd=dst)
    xa = ["getfattr", "-R", "-h", "-d", "-m", "-", "-e", "hex", "."]
    assert tool(*xa, cwd=src) == tool(*xa, cwd=dst)
    assert stat_map(src) == stat_map(dst)  # modes, owners, ns mtimes, sizes, rdev, link counts
    assert os.stat(dst / "hl1").st_ino == os.stat(dst / "hl2").st_ino == os.stat(dst / "deep/hl3").st_ino
    assert os.stat(dst / "sparse.img").st_blocks * 512 < 1 << 20
    assert not temps(dst)
    lines = log.read_text().splitlines()
    assert {"new", "symlink", "special", "hardlink", "mkdir"} <= {ln.split("\t")[1] for ln in lines}
    assert any("new\\nline" in ln for ln in lines) and all(len(ln.split("\t")) == 7 for ln in lines)


def test_push_keeps_everything_then_moves_only_changes(server: Server, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "remote/mirror"
    src.mkdir()
    make_tree(src)
    os.utime(src, ns=(5, 1_111_111_111_222_222_222))
    log = tmp_path / "sync.log"
    p = push(server, src, dst, "--acl", "--xattrs", "--log", str(log))
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary(p)
    assert_mirror(src, dst, s, log)
    assert os.stat(dst).st_mtime_ns == 1_111_111_111_222_222_222
    assert s["wire_sent"] < 4 << 20  # the 64 MiB sparse file's holes do not travel

    # nothing changed: only the listings travel
    s = summary(push(server, src, dst, "--acl", "--xattrs"))
    assert s["bytes_written"] == 0 and s["files_new"] == s["files_updated"] == s["meta_fixed"] == 0
    assert s["wire_sent"] < 16 << 10

    # content, metadata only, same bytes under a new mtime, removals and additions
    write(src / "small.txt", b"changed!\n")
    os.chmod(src / "exec.sh", 0o700)
    subprocess.run(["setfacl", "-x", "u:1234", str(src / "small.txt")], check=True)
    os.utime(src / "big.bin")  # same content: compared by digest, not sent again
    (src / "deep/a/b/c/leaf").unlink()
    write(src / "new/dir/file", b"new file")
    write(dst / "only-in-dst/x", b"extra")
    write(dst / "kept.tmp", b"excluded, so kept")
    p = push(server, src, dst, "--acl", "--xattrs", "--delete", "--exclude", "*.tmp", "--log", str(log))
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary(p)
    deleted = sorted(ln.split("\t")[5] for ln in log.read_text().splitlines() if ln.split("\t")[1] == "delete")
    assert deleted == ["deep/a/b/c/leaf", "only-in-dst", "only-in-dst/x"], deleted
    assert s["files_updated"] == 1 and s["files_new"] == 1 and s["deleted"] == 3
    assert s["meta_fixed"] >= 2 and s["bytes_written"] == len(b"changed!\n") + len(b"new file")
    assert s["wire_sent"] < 64 << 10  # big.bin (3 MiB) was not sent
    assert (dst / "kept.tmp").exists() and not (dst / "only-in-dst").exists()
    assert nothing_to_do(src, dst, "-A", "-X", "-D", "--exclude", "kept.tmp") == ""


def test_big_changed_file_travels_by_delta(server: Server, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = bytearray(os.urandom(32 << 20))
    write(src / "db.img", bytes(data))
    assert push(server, src, dst).returncode == 0
    for off in (5 << 20, 17 << 20, 30 << 20):  # three changed pages, an insertion, a deletion
        data[off:off + 4096] = os.urandom(4096)
    data[9 << 20:9 << 20] = b"inserted" * 100
    del data[25 << 20:(25 << 20) + 5000]
    write(src / "db.img", bytes(data))
    log = tmp_path / "log"
    p = push(server, src, dst, "--verify", "--log", str(log))
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary(p)
    assert s["files_delta"] == 1 and s["files_verified"] == 1
    assert (dst / "db.img").read_bytes() == bytes(data)
    # what crossed the network: the changed chunks and some signature, not 32 MiB
    assert 0 < s["delta_wire_bytes"] < 1 << 20 and s["wire_sent"] < 2 << 20
    (line,) = [ln.split("\t") for ln in log.read_text().splitlines() if ln.split("\t")[1] == "delta"]
    assert line[4] != "-" and line[5] == "db.img"
    assert nothing_to_do(src, dst) == ""


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_delta_keeps_holes_and_clones_where_it_can(server: Server, tmp_path: Path, loopfs, fs: str) -> None:
    """A sparse image changed in place: page-mode delta; holes stay holes on the agent's
    disk; on XFS the new version is a reflink clone of the old with only the changed pages
    written, on ext4 it is written whole, less its holes."""
    src = tmp_path / "src"
    dst = loopfs(fs, 300) / "mirror"
    img = bytearray(64 << 20)
    for off in (1 << 20, 20 << 20, 50 << 20):
        img[off:off + (1 << 20)] = os.urandom(1 << 20)
    write(src / "vm.img", b"")
    with open(src / "vm.img", "r+b") as f:  # sparse: only the three data regions are written
        for off in (1 << 20, 20 << 20, 50 << 20):
            f.seek(off)
            f.write(img[off:off + (1 << 20)])
        f.truncate(64 << 20)
    assert push(server, src, dst).returncode == 0
    for off in (1 << 20, (20 << 20) + 8192, (50 << 20) + 4096 * 100):
        img[off:off + 4096] = os.urandom(4096)
        with open(src / "vm.img", "r+b") as f:
            f.seek(off)
            f.write(img[off:off + 4096])
    p = push(server, src, dst, "--verify")
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary(p)
    assert s["files_delta"] == 1 and s["delta_wire_bytes"] == 3 * 4096
    assert (dst / "vm.img").read_bytes() == bytes(img)
    assert os.stat(dst / "vm.img").st_blocks * 512 < 4 << 20  # 3 MiB of data, holes kept
    if fs == "xfs":
        assert s["delta_reflinked"] == 1 and s["delta_bytes_written"] == 3 * 4096
    else:
        assert s["delta_reflinked"] == 0 and s["delta_bytes_written"] == 3 << 20


@needs_tools("setpriv")
def test_unreadable_source_entries_are_listed_and_never_deleted_remotely(server: Server, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    unreadable_tree(src, dst)
    p = push(server, src, dst, "--delete", prefix=NO_DAC)
    assert p.returncode == 3, p.stdout + p.stderr
    s = summary(p)
    assert {(x["path"], x["kind"]) for x in s["problems"]} == {("b-secret", "unreadable"), ("c-locked", "unreadable")}
    assert (dst / "a-ok").read_bytes() == b"fine" and not (dst / "b-secret").exists()
    assert (dst / "c-locked/old").exists()


@pytest.mark.parametrize("old", [None, b"an older version " * 400_000], ids=["new", "delta"])
def test_file_that_keeps_changing_is_reported_not_installed(server: Server, tmp_path: Path,
                                                             old: bytes | None) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "growing.log", os.urandom(48 << 20))
    write(src / "steady", b"steady")
    if old is not None:  # then it goes by delta, and the sender reads it when the agent asks
        write(dst / "growing.log", old)
    with growing(src / "growing.log"):
        p = push(server, src, dst)
    assert p.returncode == 3, p.stdout + p.stderr
    probs = summary(p)["problems"]
    assert [(x["path"], x["kind"]) for x in probs] == [("growing.log", "changed")]
    assert "3 times" in probs[0]["message"]
    assert (dst / "steady").exists() and not temps(dst)
    if old is None:
        assert not (dst / "growing.log").exists()
    else:
        assert (dst / "growing.log").read_bytes() == old


def test_full_remote_disk_exits_14_and_leaves_no_partial_file(server: Server, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)
    try:
        src = tmp_path / "src"
        write(src / "a-fits", os.urandom(2 << 20))
        write(src / "b-too-big", os.urandom(8 << 20))
        write(src / "c-after", b"never reached")
        p = push(server, src, mnt / "dst")
        assert p.returncode == 14, p.stdout + p.stderr
        assert "full" in p.stdout
        assert (mnt / "dst/a-fits").read_bytes() == (src / "a-fits").read_bytes()
        assert not (mnt / "dst/b-too-big").exists() and not temps(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_dropped_connection_leaves_no_temp_file(server: Server, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "huge", os.urandom(256 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "deltavault", "sync", "--remote-command", REMOTE,
                             str(src), f"dvtest:{dst}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "DELTAVAULT_SSH_CONFIG": str(server.ssh_config)})
    deadline = time.monotonic() + 60
    while not (dst.exists() and temps(dst)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    server.kill_sessions()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 15, (out, err)
    assert b"ssh to dvtest failed" in err
    deadline = time.monotonic() + 20  # the agent sees its input end and removes its temp file
    while temps(dst) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not temps(dst) and not (dst / "huge").exists()


@needs_tools("btrfs")
def test_push_from_a_btrfs_snapshot(server: Server, tmp_path: Path, btrfs_src: tuple[Path, Path]) -> None:
    _mnt, src = btrfs_src
    # SRC is a directory inside the subvolume: the subvolume's root gets the snapshot folder
    p = push(server, src / "docs", tmp_path / "dst", "--snapshot", "btrfs", "--xattrs")
    assert p.returncode == 0, p.stdout + p.stderr
    assert summary(p)["snapshot"]["kind"] == "btrfs"
    assert nothing_to_do(src / "docs", tmp_path / "dst", "-X") == ""
    assert not (src / ".deltavault-snapshots").exists() or not any((src / ".deltavault-snapshots").iterdir())


def test_pull_keeps_everything_and_reports_here(server: Server, tmp_path: Path) -> None:
    src, dst = tmp_path / "remote/src", tmp_path / "here"
    src.mkdir(parents=True)
    make_tree(src)
    log = tmp_path / "sync.log"
    p = pull(server, src, dst, "--acl", "--xattrs", "--log", str(log))
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary(p)
    assert_mirror(src, dst, s, log)
    assert s["wire_received"] < 4 << 20 and s["wire_sent"] < 1 << 20

    data = bytearray((src / "big.bin").read_bytes())
    data[100_000:100_100] = os.urandom(100)
    write(src / "big.bin", bytes(data), 0o600)
    (src / "small.txt").unlink()
    write(dst / "only-here", b"extra")
    p = pull(server, src, dst, "--acl", "--xattrs", "--delete", "--delta-min", "1M")
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary(p)
    assert s["files_delta"] == 1 and s["deleted"] == 2 and s["delta_wire_bytes"] == 4096
    assert s["wire_received"] < 64 << 10  # one page, signatures and listings
    assert nothing_to_do(src, dst, "-A", "-X", "-D", "--delete") == ""


def test_pull_errors_are_clear(server: Server, tmp_path: Path) -> None:
    p = pull(server, tmp_path / "no-such-dir", tmp_path / "here")
    assert p.returncode == 2 and "no-such-dir does not exist" in p.stdout, p.stdout  # as a local sync says
    write(tmp_path / "src/f", b"x")
    write(tmp_path / "a-file", b"in the way")
    p = pull(server, tmp_path / "src", tmp_path / "a-file/sub")
    assert p.returncode == 17 and "not a directory" in p.stdout, p.stdout
    p = pull(server, tmp_path / "src", tmp_path / "here", remote="no-such-deltavault")
    assert p.returncode == 17 and "install deltavault there" in p.stdout, p.stdout


@needs_tools("btrfs")
def test_pull_from_a_btrfs_snapshot_taken_on_the_source_host(server: Server, tmp_path: Path,
                                                             btrfs_src: tuple[Path, Path]) -> None:
    _mnt, src = btrfs_src
    p = pull(server, src / "docs", tmp_path / "here", "--snapshot", "btrfs")
    assert p.returncode == 0, p.stdout + p.stderr
    assert summary(p)["snapshot"] == {"kind": "btrfs", "on": "dvtest"}
    assert nothing_to_do(src / "docs", tmp_path / "here") == ""
    assert not (src / ".deltavault-snapshots").exists() or not any((src / ".deltavault-snapshots").iterdir())
