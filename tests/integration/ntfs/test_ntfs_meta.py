"""NTFS metadata through file backup and restore, on real ntfs-3g mounts of mkntfs images:
security descriptors, DOS attributes, times, reparse points and named streams. Metadata that
does not parse or is not valid is in test_ntfs_meta_invalid.py."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from pathlib import Path

import msgspec

from deltavault.backup.files.options import FileBackupOptions
from deltavault.backup.files.run import BackupRequest, BackupResult, run_backup
from deltavault.fs.mounts import find_mount
from deltavault.fs.ntfs import ARCHIVE, HIDDEN, READONLY, SYSTEM
from deltavault.model.nodes import Node, Tree
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from tests.conftest import needs_root, needs_tools
from tests.integration.ntfs.ntfsutil import junction, ntfs, ntfs_view, streams_of
from tests.loopdev import loop, mounted

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


def test_stream_changed_in_place_stores_only_its_changed_chunks(tmp_path: Path, repo: Repository) -> None:
    """4 KiB changed inside a 16 MiB stream: the file and all its streams are read again
    (ntfs-3g shows nothing per stream that says which changed: docs/windows.md), but only
    the chunks holding the change are stored: at most two of the repository's largest
    (2 MiB), not the stream, nor the 5 MiB stream next to it, nor the other file."""
    huge = 16 * 1024 * 1024
    with ntfs(tmp_path, "src") as src:
        d = src / "data"
        d.mkdir()
        (d / "a.txt").write_text("a")
        (d / "a.txt:big").write_bytes(os.urandom(huge))
        (d / "a.txt:other").write_bytes(os.urandom(BIG))
        (d / "b.txt").write_bytes(os.urandom(BIG))
        first = backup(repo, d)
        with open(d / "a.txt:big", "r+b") as f:
            f.seek(7 * 1024 * 1024 + 123)
            f.write(os.urandom(4096))
        res = backup(repo, d)
    assert huge + BIG <= res.stats.bytes_read < huge + BIG + 4096  # a.txt and its streams, not b.txt
    assert res.snapshot.summary.files_unmodified == 1
    assert 4096 < res.bytes_added - first.bytes_added < 2 * 2 * 1024 * 1024 + 64 * 1024
    win = tree_nodes(repo, res)[b"a.txt"].win
    assert win is not None and [(s.name, s.size) for s in win.streams] == [(b"big", huge), (b"other", BIG)]


def test_directory_streams_backed_up_and_restored(tmp_path: Path, repo: Repository) -> None:
    """NTFS allows named streams on directories too (``dir:stream`` on ntfs-3g): stored like
    a file's, restored onto NTFS as streams and onto ext4 as ``user.`` xattrs; a changed one
    is stored again on the next run, an unchanged tree keeps its id."""
    with ntfs(tmp_path, "src") as src:
        d = src / "data"
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_text("f")
        Path(f"{d / 'sub'}:small").write_bytes(b"0123456789")
        Path(f"{d / 'sub'}:big").write_bytes(os.urandom(BIG))
        Path(f"{d}:top").write_bytes(b"on the backed-up directory itself")
        res = backup(repo, d)
        assert not res.problems, res.problems
        res = backup(repo, d)  # (records the access times the first run's listing moved)
        again = backup(repo, d)
        assert again.snapshot.tree == res.snapshot.tree  # unchanged: the same tree
        Path(f"{d / 'sub'}:small").write_bytes(b"changed!!!")
        changed = backup(repo, d)
        assert changed.snapshot.tree != res.snapshot.tree
        want = {"small": b"changed!!!", "big": Path(f"{d / 'sub'}:big").read_bytes()}
    sub = tree_nodes(repo, changed)[b"sub"]
    assert sub.win is not None and [(s.name, s.size) for s in sub.win.streams] == [(b"big", BIG), (b"small", 10)]
    with ntfs(tmp_path, "dst") as dst:
        r = FileRestorer(repo, dst, RestoreOptions(verify=True))
        assert changed.snapshot.tree is not None
        r.run(changed.snapshot.tree)
        assert not r.problems, r.problems
        got = {n: Path(f"{dst / 'data' / 'sub'}:{n}").read_bytes() for n in want}
        assert got == want
        assert Path(f"{dst / 'data'}:top").read_bytes() == b"on the backed-up directory itself"
        assert r.stats.bytes_verified >= BIG + 10
    target = tmp_path / "ext4"
    target.mkdir()
    restore(repo, changed, target)
    assert os.getxattr(target / "data" / "sub", "user.small") == b"changed!!!"
    assert os.getxattr(target / "data", "user.top") == b"on the backed-up directory itself"


def tree_nodes(repo: Repository, res: BackupResult) -> dict[bytes, Node]:
    assert res.snapshot.tree is not None
    root = msgspec.msgpack.decode(repo.load_blob(res.snapshot.tree), type=Tree).nodes
    assert root[0].subtree is not None
    return {n.name: n for n in msgspec.msgpack.decode(repo.load_blob(root[0].subtree), type=Tree).nodes}


def test_restore_onto_ext4_warns_once_and_keeps_small_streams(tmp_path: Path, repo: Repository) -> None:
    long_name = "n" * 254  # NTFS takes it; as user.<name> it is over Linux's 255-byte xattr name limit
    with ntfs(tmp_path, "src") as src:
        d = src / "data"
        d.mkdir()
        f = d / "doc.txt"
        f.write_text("doc")
        (d / "doc.txt:small").write_bytes(b"0123456789")
        (d / "doc.txt:big").write_bytes(os.urandom(BIG))
        Path(f"{f}:{long_name}").write_bytes(b"x")
        set_attrib(f, HIDDEN | ARCHIVE)
        (d / "other.txt").write_text("o")
        res = backup(repo, d)
        assert not res.problems, res.problems
    target = tmp_path / "ext4"  # tmp_path is on the root file system: ext4 on this VM
    target.mkdir()
    r = restore(repo, res, target)
    out = target / "data" / "doc.txt"
    assert out.read_text() == "doc"
    assert os.getxattr(out, "user.small") == b"0123456789"
    assert "user.big" not in os.listxattr(out)
    lost = [p for p in r.warnings if "NTFS metadata not kept" in p.message]
    assert len(lost) == 1, r.warnings
    msg = lost[0].message
    for kind in ("security descriptors", "DOS attributes", "creation times", "streams over 64 KiB"):
        assert kind in msg, msg
    # Every entry has a descriptor, attributes and times (data, doc.txt, other.txt), one big stream.
    assert r.stats.ntfs_not_kept == 3 * 3 + 1
    bad_name = [p for p in r.problems if "name not valid on the target" in p.message]
    assert len(bad_name) == 1 and bad_name[0].path.endswith("doc.txt"), r.problems
    assert (target / "data" / "other.txt").read_text() == "o"  # the run went on


def test_default_mount_streams_as_xattrs(tmp_path: Path, repo: Repository) -> None:
    """Without streams_interface (ntfs-3g's default is xattr): small streams are stored, one
    over 64 KiB is not visible there, which the run says; restored onto a windows-interface
    mount as streams."""
    with ntfs(tmp_path, "src") as src:  # made and filled through the windows interface
        d = src / "data"
        d.mkdir()
        (d / "f").write_text("f")
        (d / "f:small").write_bytes(b"0123456789")
        (d / "f:big").write_bytes(os.urandom(BIG))
    with ntfs(tmp_path, "src", streams=None) as src:
        res = backup(repo, src / "data")
    warned = [p for p in res.problems if "over 64 KiB" in p.message]
    assert len(warned) == 1 and "streams_interface=windows" in warned[0].message, res.problems
    assert res.partial  # a stream that exists was not stored
    win = tree_nodes(repo, res)[b"f"].win
    assert win is not None and [s.name for s in win.streams] == [b"small"]
    assert all(not n.startswith(b"user.") for n, _ in tree_nodes(repo, res)[b"f"].xattrs)
    with ntfs(tmp_path, "dst") as dst:
        r = restore(repo, res, dst)
        assert not r.problems, r.problems
        assert (dst / "data" / "f:small").read_bytes() == b"0123456789"


def test_streams_interface_none_says_streams_are_not_visible(tmp_path: Path, repo: Repository) -> None:
    with ntfs(tmp_path, "src") as src:
        (src / "data").mkdir()
        (src / "data" / "f").write_text("f")
        (src / "data" / "f:s").write_bytes(b"s")
    with ntfs(tmp_path, "src", streams="none") as src:
        res = backup(repo, src / "data")
    assert [p.message for p in res.problems if "not visible" in p.message], res.problems
    assert not res.partial  # said, but nothing seen was lost
    win = tree_nodes(repo, res)[b"f"].win
    assert win is not None and win.sd and not win.streams


@needs_tools("losetup")
def test_block_device_mount_is_fuseblk(tmp_path: Path, repo: Repository) -> None:
    """On a loop device ntfs-3g's mount is ``fuseblk`` (an image file gives ``fuse``): both
    are found; streams and attributes come through."""
    with ntfs(tmp_path, "img") as m:
        (m / "f").write_text("f")
        (m / "f:s").write_bytes(b"stream")
        set_attrib(m / "f", HIDDEN | ARCHIVE)
    with loop(tmp_path / "img.img") as dev, mounted(dev, tmp_path / "blk", "-t", "ntfs-3g", "-o",
                                                    "streams_interface=windows") as mnt:
        assert find_mount(str(mnt)).fstype == "fuseblk"
        res = backup(repo, mnt)
    # ntfs-3g cannot read the descriptor of the root directory mkntfs made (EIO): said, and
    # the rest of its metadata kept.
    assert [(p.path, p.message) for p in res.problems] == [
        (str(tmp_path / "blk"), "NTFS security descriptor unreadable: Input/output error")]
    assert res.snapshot.tree is not None
    root = msgspec.msgpack.decode(repo.load_blob(res.snapshot.tree), type=Tree).nodes
    assert root[0].subtree is not None
    f = {n.name: n for n in msgspec.msgpack.decode(repo.load_blob(root[0].subtree), type=Tree).nodes}[b"f"]
    assert f.win is not None and f.win.attrib == HIDDEN | ARCHIVE
    assert [(s.name, s.size) for s in f.win.streams] == [(b"s", 6)]


def test_hard_links_share_streams(tmp_path: Path, repo: Repository) -> None:
    with ntfs(tmp_path, "src") as src:
        d = src / "data"
        d.mkdir()
        (d / "a").write_text("a")
        (d / "a:s").write_bytes(b"stream")
        os.link(d / "a", d / "b")
        res = backup(repo, d)
        assert not res.problems, res.problems
    nodes = tree_nodes(repo, res)
    assert nodes[b"a"].win == nodes[b"b"].win
    assert nodes[b"b"].win is not None and nodes[b"b"].win.streams[0].content
    with ntfs(tmp_path, "dst") as dst:
        r = restore(repo, res, dst)
        assert not r.problems, r.problems
        assert (dst / "data" / "b:s").read_bytes() == b"stream"
        assert os.stat(dst / "data" / "a").st_ino == os.stat(dst / "data" / "b").st_ino


def test_unchanged_tree_is_the_same_tree(tmp_path: Path, repo: Repository) -> None:
    """Listing a directory moves its NTFS access time (ntfs-3g's relatime) with the POSIX
    atime: the run after that records it, as for any file system; the next keeps the tree."""
    with ntfs(tmp_path, "src") as src:
        d = src / "data"
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_text("f")
        (d / "sub" / "f:s").write_bytes(b"s" * 100)
        os.utime(d / "sub", (1_000_000_000, time.time()))  # atime before mtime: the next listing moves it
        backup(repo, d)
        assert os.stat(d / "sub").st_atime > 1_000_000_000  # the backup's listing moved it
        first = backup(repo, d)
        second = backup(repo, d)
    assert second.snapshot.tree == first.snapshot.tree
    assert second.snapshot.summary.bytes_total == 1 + 100


def test_large_stream_keeps_no_page_digests(tmp_path: Path, repo: Repository) -> None:
    """A stream over the delta threshold is stored in chunks like a file, without the page
    digests only a file's node can keep: no META blob is left unreferenced. (Asked for
    anyway, the digest helper happens to give none for a stream today: this guards the
    invariant, the reader's page_digests=False is what keeps it.)"""
    with ntfs(tmp_path, "src", size="128M") as src:
        (src / "data").mkdir()
        (src / "data" / "f").write_text("f")
        data = os.urandom(3 * 1024 * 1024)
        (src / "data" / "f:big").write_bytes(data)
        time.sleep(0.06)
        res = run_backup(repo, BackupRequest(paths=[str(src / "data")], options=FileBackupOptions(
            racy_window_ns=RACY, delta_threshold=1024 * 1024)))
    win = tree_nodes(repo, res)[b"f"].win
    assert win is not None and sum(r.size for r in win.streams[0].content) == len(data)
    assert not [e for _b, _p, e, _s in repo.index.iter_records() if e.type == BlobType.META]


def test_restore_verify_reads_streams_back(tmp_path: Path, repo: Repository) -> None:
    with ntfs(tmp_path, "src") as src:
        (src / "data").mkdir()
        (src / "data" / "f").write_text("f")
        (src / "data" / "f:big").write_bytes(os.urandom(BIG))
        res = backup(repo, src / "data")
    assert res.snapshot.tree is not None
    with ntfs(tmp_path, "dst") as dst:
        r = FileRestorer(repo, dst, RestoreOptions(verify=True))
        r.run(res.snapshot.tree)
        assert not r.problems, r.problems
        assert r.stats.bytes_verified == 1 + BIG


def test_other_file_system_mounted_below_is_not_ntfs(tmp_path: Path, repo: Repository) -> None:
    """A tmpfs mounted inside the ntfs-3g tree: its entries get no NTFS metadata, and their
    user.* xattrs stay xattrs (on an xattr-interface mount those would be streams)."""
    with ntfs(tmp_path, "src") as src:
        (src / "data" / "inner").mkdir(parents=True)
        (src / "data" / "f").write_text("f")
    with ntfs(tmp_path, "src", streams="xattr") as src:
        inner = src / "data" / "inner"
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
        try:
            (inner / "g").write_text("g")
            os.setxattr(inner / "g", "user.kept", b"xattr")
            res = backup(repo, src / "data")
        finally:
            subprocess.run(["umount", str(inner)], check=True)
    nodes = tree_nodes(repo, res)
    assert nodes[b"f"].win is not None and nodes[b"inner"].win is None
    inner_tree = msgspec.msgpack.decode(repo.load_blob(nodes[b"inner"].subtree or b""), type=Tree).nodes
    assert inner_tree[0].win is None and inner_tree[0].xattrs == [(b"user.kept", b"xattr")]
