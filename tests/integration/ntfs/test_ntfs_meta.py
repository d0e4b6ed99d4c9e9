"""NTFS metadata through file backup and restore, on real ntfs-3g mounts of mkntfs images:
security descriptors, DOS attributes, times, reparse points and named streams."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import msgspec

from deltavault.backup.files.options import FileBackupOptions
from deltavault.backup.files.run import BackupRequest, BackupResult, run_backup
from deltavault.fs.ntfs import ARCHIVE, HIDDEN, READONLY, SYSTEM
from deltavault.model.nodes import Node, Tree
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from tests.conftest import needs_root, needs_tools
from tests.integration.ntfs.ntfsutil import junction, ntfs, ntfs_view

pytestmark = [needs_root(), needs_tools("mkntfs", "ntfs-3g", "getfattr")]

RACY = 50_000_000
BIG = 5 * 1024 * 1024
OLD_CRTIME = 130_000_000_000_000_000  # 2012, in 100 ns ticks since 1601


def backup(repo: Repository, path: Path) -> BackupResult:
    time.sleep(0.06)
    res = run_backup(repo, BackupRequest(paths=[str(path)], options=FileBackupOptions(racy_window_ns=RACY)))
    time.sleep(0.06)
    return res


def restore(repo: Repository, res: BackupResult, target: Path) -> FileRestorer:
    r = FileRestorer(repo, target, RestoreOptions())
    assert res.snapshot.tree is not None
    r.run(res.snapshot.tree)
    return r


def set_attrib(p: Path, bits: int) -> None:
    os.setxattr(p, "system.ntfs_attrib", struct.pack("<I", bits))


def populate(root: Path) -> list[str]:
    """A tree with every kind of NTFS metadata; returns the entries to compare."""
    d = root / "data"
    d.mkdir()
    f = d / "doc.txt"
    f.write_text("hello ntfs\n")
    # An ACL changed through system.ntfs_acl: Everyone gets read only instead of full control.
    sd = os.getxattr(f, "system.ntfs_acl")
    full = bytes.fromhex("ff011f00")
    assert full in sd
    os.setxattr(f, "system.ntfs_acl", sd.replace(full, bytes.fromhex("89001200")))
    (d / "doc.txt:small").write_bytes(b"0123456789")
    (d / "doc.txt:big").write_bytes(os.urandom(BIG))
    os.setxattr(f, "system.ntfs_crtime", struct.pack("<Q", OLD_CRTIME))
    set_attrib(f, HIDDEN | SYSTEM | ARCHIVE)
    ro = d / "readonly.txt"
    ro.write_text("read only\n")
    set_attrib(ro, READONLY | ARCHIVE)
    (d / "sub").mkdir()
    set_attrib(d / "sub", HIDDEN | 0x10)
    os.symlink("doc.txt", d / "link")
    junction(d / "junction", "C:\\target")
    return ["data", "data/doc.txt", "data/readonly.txt", "data/sub", "data/link", "data/junction"]


def streams_of(p: Path) -> dict[str, bytes]:
    names = [n for n in os.getxattr(p, "ntfs.streams.list").split(b"\0") if n]
    return {n.decode(): (Path(f"{p}:{n.decode()}")).read_bytes() for n in names}


def test_backup_restore_ntfs_to_ntfs_byte_identical(tmp_path: Path, repo: Repository) -> None:
    with ntfs(tmp_path, "src") as src:
        entries = populate(src)
    # Mounted again: the kernel caches the junction as the directory it was made as (EIO).
    # noatime: the backup's reads leave the access times as they were.
    with ntfs(tmp_path, "src", options="noatime") as src:
        before = {e: ntfs_view(src, e) for e in entries}
        src_streams = streams_of(src / "data" / "doc.txt")
        res = backup(repo, src / "data")
        assert not res.problems, res.problems
    assert before["data/doc.txt"]["system.ntfs_attrib"].endswith("0x26000000")
    assert before["data/junction"]["system.ntfs_reparse_data"].startswith("system.ntfs_reparse_data=0x030000a0")
    with ntfs(tmp_path, "dst") as dst:
        r = restore(repo, res, dst)
        assert not r.problems, r.problems
    with ntfs(tmp_path, "dst") as dst:  # mounted again: what NTFS holds, not what FUSE cached
        after = {e: ntfs_view(dst, e) for e in entries}
        assert streams_of(dst / "data" / "doc.txt") == src_streams
        assert os.readlink(dst / "data" / "link") == "doc.txt"
    for e in entries:
        assert after[e] == before[e], e
    assert set(src_streams) == {"small", "big"} and len(src_streams["big"]) == BIG


def test_changed_stream_stores_only_that_stream(tmp_path: Path, repo: Repository) -> None:
    with ntfs(tmp_path, "src") as src:
        d = src / "data"
        d.mkdir()
        (d / "a.txt").write_text("a")
        (d / "a.txt:big").write_bytes(os.urandom(BIG))
        (d / "b.txt").write_bytes(os.urandom(BIG))
        first = backup(repo, d)
        (d / "a.txt:small").write_bytes(b"0123456789")
        res = backup(repo, d)
    # Only a.txt is read again (its streams with it: ntfs-3g keeps one mtime per file);
    # b.txt is not; only the new stream is stored.
    assert BIG <= res.stats.bytes_read < BIG + 4096
    assert res.snapshot.summary.files_unmodified == 1
    assert res.bytes_added - first.bytes_added < 64 * 1024  # the repository object counts since opened
    nodes = tree_nodes(repo, res)
    win = nodes[b"a.txt"].win
    assert win is not None and [(s.name, s.size) for s in win.streams] == [(b"big", BIG), (b"small", 10)]


def tree_nodes(repo: Repository, res: BackupResult) -> dict[bytes, Node]:
    assert res.snapshot.tree is not None
    root = msgspec.msgpack.decode(repo.load_blob(res.snapshot.tree), type=Tree).nodes
    assert root[0].subtree is not None
    return {n.name: n for n in msgspec.msgpack.decode(repo.load_blob(root[0].subtree), type=Tree).nodes}


def test_owner_sid_parsed_and_bad_descriptor_kept(tmp_path: Path, repo: Repository) -> None:
    with ntfs(tmp_path, "src") as src:
        d = src / "data"
        d.mkdir()
        (d / "good").write_text("g")
        (d / "bad").write_text("b")
        sd = os.getxattr(d / "bad", "system.ntfs_acl")
        # The owner offset pointed past the end: ntfs-3g refuses such a descriptor, so the
        # backup's parse is checked with one given to it directly (below).
        res = backup(repo, d)
    nodes = tree_nodes(repo, res)
    assert nodes[b"good"].win is not None and nodes[b"good"].win.owner.startswith("S-1-5-")
    from deltavault.fs.ntfssd import BadDescriptor, owner_group
    bad = sd[:4] + struct.pack("<I", 10_000) + sd[8:]
    try:
        owner_group(bad)
    except BadDescriptor:
        pass
    else:
        raise AssertionError("a descriptor whose owner lies outside it parsed")
