"""Local cache pieces on their own: private directories and files, authenticated catalog
rows, the catalog writer's write-through blobs, the volume state file, and the parent
snapshot's trees read at any depth."""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
import threading
from pathlib import Path

import blake3
import msgspec
import pytest

from deltavault.backup.files.catalog import Catalog
from deltavault.backup.files.catalog_writer import CatalogWriter
from deltavault.backup.files.previous import TreePrevious
from deltavault.backup.volume.state import LocalState
from deltavault.fs.files import (
    UnsafeCacheDir,
    open_cache,
    private_dir,
    read_cache_file,
    write_cache_file,
)
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.tracking.volume.access import sweep

KEY = blake3.blake3(b"test catalog key").digest()


def _blob_id(data: bytes) -> bytes:
    return blake3.blake3(data, key=KEY).digest()


def _catalog(path: Path, key: bytes | None = KEY) -> Catalog:
    return Catalog(path, key=key, blob_id=_blob_id)


# ---------------------------------------------------------------- private files

def test_private_dir_refuses_what_is_not_ours_alone(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(UnsafeCacheDir, match="is a symbolic link"):
        private_dir(tmp_path / "link")
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o770)
    with pytest.raises(UnsafeCacheDir, match=r"writable by group or others \(mode 0770\)"):
        private_dir(tmp_path / "open")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UnsafeCacheDir, match="is not a directory"):
        private_dir(tmp_path / "file")
    if os.geteuid() == 0:
        (tmp_path / "theirs").mkdir(mode=0o700)
        os.chown(tmp_path / "theirs", 65534, 65534)
        with pytest.raises(UnsafeCacheDir, match=r"owned by another user \(uid 65534\)"):
            private_dir(tmp_path / "theirs")


def test_modes_are_exact_whatever_the_umask(tmp_path: Path) -> None:
    for umask in (0o000, 0o022, 0o277):
        old = os.umask(umask)
        try:
            d = tmp_path / f"u{umask:o}"
            assert write_cache_file(d / "a" / "b" / "f", b"data")
        finally:
            os.umask(old)
        for p in (d, d / "a", d / "a" / "b"):
            assert stat.S_IMODE(p.stat().st_mode) == 0o700, (umask, p)
        assert stat.S_IMODE((d / "a" / "b" / "f").stat().st_mode) == 0o600
        assert read_cache_file(d / "a" / "b" / "f") == b"data"


def test_read_trusts_only_regular_files_of_ours(tmp_path: Path) -> None:
    d = tmp_path / "c"
    assert write_cache_file(d / "real", b"mine")
    os.mkfifo(d / "fifo")  # would block an open without O_NONBLOCK
    (d / "link").symlink_to(d / "real")
    assert read_cache_file(d / "fifo") is None
    assert read_cache_file(d / "link") is None
    assert read_cache_file(d / "absent") is None
    (d / "real").chmod(0o644)
    assert read_cache_file(d / "real") == b"mine"
    assert stat.S_IMODE((d / "real").stat().st_mode) == 0o600  # made private when read


def test_open_cache_refuses_a_repository_id_that_is_a_path(tmp_path: Path) -> None:
    for bad in ("..", "a/b", ""):
        path, note = open_cache(tmp_path / "cache", bad)
        assert path is None and note is not None and "cannot name a cache directory" in note[1]
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- catalog rows

def _tree(*names: bytes) -> bytes:
    return msgspec.msgpack.encode(Tree([Node(name=n, type=NodeType.FILE, size=1) for n in names]))


def _fill(cat: Catalog, blobs: list[bytes]) -> None:
    w = CatalogWriter(cat, "src")
    w.put_dir(b"", b"t" * 32, _tree(b"a"))
    w.put_dir(b"d", b"u" * 32, _tree(b"b"))
    for data in blobs:
        w.put_blob(_blob_id(data), data)
    w.commit("snap", 123, keep_blobs={_blob_id(d) for d in blobs}, index_files={"index/x"})


def test_rows_from_another_key_are_refused(tmp_path: Path) -> None:
    """A catalog copied from another repository (or forged without the key) is not used."""
    cat = _catalog(tmp_path / "c.sqlite", key=blake3.blake3(b"another key").digest())
    _fill(cat, [])
    cat.close()
    cat = _catalog(tmp_path / "c.sqlite")
    assert cat.source_state("src") is None and cat.get_dir("src", b"") is None
    assert cat.rejected == {"sources": 1, "dirs": 1}
    assert cat.get_dir("src", b"") is None and cat.rejected["dirs"] == 1  # removed: not met again
    cat.close()


def test_a_row_moved_to_another_path_is_refused(tmp_path: Path) -> None:
    cat = _catalog(tmp_path / "c.sqlite")
    _fill(cat, [])
    db = sqlite3.connect(tmp_path / "c.sqlite")
    with db:  # the genuine row of "d", tag and all, now claims to be the root's
        db.execute("DELETE FROM dirs WHERE path=x''")
        db.execute("UPDATE dirs SET path=x'' WHERE path=?", (b"d",))
    db.close()
    assert cat.get_dir("src", b"") is None and cat.rejected["dirs"] == 1
    assert cat.source_state("src") is not None
    cat.close()


def test_wrong_column_types_are_refused_not_fatal(tmp_path: Path) -> None:
    cat = _catalog(tmp_path / "c.sqlite")
    _fill(cat, [b"x" * 100])
    db = sqlite3.connect(tmp_path / "c.sqlite")
    with db:
        db.execute("UPDATE dirs SET tree='text'")
        db.execute("UPDATE sources SET run_start_ns='soon'")
        db.execute("UPDATE blobs SET data=12")
    db.close()
    assert cat.get_dir("src", b"") is None and cat.source_state("src") is None
    assert cat.get_blob("src", _blob_id(b"x" * 100)) is None
    assert cat.rejected == {"dirs": 1, "sources": 1, "blobs": 1}
    note = cat.rejection_note()
    assert note.startswith("entries of the local catalog failed verification (1 source record, 1 directory, "
                           "1 page-digest block)")
    cat.close()


def test_unencrypted_rows_carry_no_tag_and_are_taken(tmp_path: Path) -> None:
    """No key, no authentication (see the catalog's doc): the cache's privacy protects it."""
    cat = _catalog(tmp_path / "c.sqlite", key=None)
    _fill(cat, [])
    db = sqlite3.connect(tmp_path / "c.sqlite")
    assert {bytes(r[0]) for r in db.execute("SELECT mac FROM dirs")} == {b""}
    db.close()
    assert cat.get_dir("src", b"d") is not None and not cat.rejected
    cat.close()


def test_put_blob_writes_through_from_many_threads(tmp_path: Path) -> None:
    cat = _catalog(tmp_path / "c.sqlite")
    w = CatalogWriter(cat, "src")
    blobs = [os.urandom(4096) + bytes([t, i]) for t in range(8) for i in range(50)]

    def put(t: int) -> None:
        for data in blobs[t * 50:(t + 1) * 50]:
            w.put_blob(_blob_id(data), data)

    threads = [threading.Thread(target=put, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other = sqlite3.connect(tmp_path / "c.sqlite")  # already in the file, before any commit
    assert other.execute("SELECT count(*) FROM blobs").fetchone()[0] == len(blobs)
    keep = {_blob_id(d) for d in blobs[:10]}
    w.commit("snap", 1, keep_blobs=keep, index_files=set())
    assert {bytes(r[0]) for r in other.execute("SELECT id FROM blobs")} == keep
    other.close()
    assert cat.get_blob("src", _blob_id(blobs[3])) == blobs[3]
    cat.close()


def test_directory_rows_wait_for_the_commit(tmp_path: Path) -> None:
    """A run that fails before commit leaves the previous rows as they were."""
    cat = _catalog(tmp_path / "c.sqlite")
    _fill(cat, [])
    w = CatalogWriter(cat, "src")
    for i in range(3000):  # more than one flush to the temporary table
        w.put_dir(b"n%d" % i, b"v" * 32, _tree(b"z"))
    assert cat.get_dir("src", b"n5") is None and cat.get_dir("src", b"d") is not None
    cat.close()
    cat = _catalog(tmp_path / "c.sqlite")
    assert cat.get_dir("src", b"n5") is None and cat.get_dir("src", b"d") is not None
    w = CatalogWriter(cat, "src")
    w.put_dir(b"n5", b"v" * 32, _tree(b"z"))
    w.commit("snap2", 2, keep_blobs=set(), index_files=set())
    assert cat.get_dir("src", b"n5") is not None
    assert cat.get_dir("src", b"d") is None  # not visited by this run
    assert not cat.rejected
    cat.close()


# ---------------------------------------------------------------- volume state

def _state_file(tmp_path: Path) -> Path:
    [p] = (tmp_path / "cache").rglob("state.json")
    return p


def test_volume_state_with_a_key_ignores_an_edited_file(tmp_path: Path) -> None:
    key = blake3.blake3(b"volume state key").digest()
    st = LocalState.load(tmp_path / "cache", "vol", key=key)
    st.add_pending("qemu-bitmap", "dv-0123456789abcdef", "/images/vm.qcow2")
    again = LocalState.load(tmp_path / "cache", "vol", key=key)
    assert again.pending == st.pending and again.note == ""
    path = _state_file(tmp_path)
    data = msgspec.json.decode(path.read_bytes())
    data["pending"].append({"kind": "btrfs", "handle": "/data/dv-precious", "where": "/images/vm.qcow2"})
    path.write_bytes(msgspec.json.encode(data))
    tampered = LocalState.load(tmp_path / "cache", "vol", key=key)
    assert tampered.pending == [] and "fails its authentication" in tampered.note
    removed: list[str] = []
    sweep(tampered, "btrfs", "/images/vm.qcow2", keep=None, previous=None, exists=lambda h: True,
          remove=lambda h: removed.append(h) or None, what="snapshot")
    assert removed == []
    # another source's genuine file is not this one's either
    other = LocalState.load(tmp_path / "cache", "vol2", key=key)
    other.path = path
    other.save()
    assert LocalState.load(tmp_path / "cache", "vol", key=key).pending == []


def test_volume_state_keeps_only_handles_deltavault_makes(tmp_path: Path) -> None:
    """Without a key (an unencrypted repository) the shape of each entry is still checked."""
    st = LocalState.load(tmp_path / "cache", "vol")
    st.save()
    path = _state_file(tmp_path)
    good = [{"kind": "btrfs", "handle": "/m/.deltavault-snapshots/dv-00ff", "where": "/m/disk.img"},
            {"kind": "qemu-bitmap", "handle": "dv-killedrun00000", "where": "/m/vm.qcow2"}]
    bad = [{"kind": "btrfs", "handle": "/home", "where": "/m/disk.img"},
           {"kind": "btrfs", "handle": "/m/x/../../dv-1", "where": "/m/disk.img"},
           {"kind": "btrfs", "handle": "dv-relative", "where": "/m/disk.img"},
           {"kind": "qemu-bitmap", "handle": "their-bitmap", "where": "/m/vm.qcow2"},
           {"kind": "rm", "handle": "dv-1", "where": "/"},
           {"kind": "qemu-bitmap", "handle": "dv-1", "where": "/m/vm.qcow2", "extra": "x"},
           "not a dict"]
    path.write_bytes(msgspec.json.encode({"pending": good + bad}))
    loaded = LocalState.load(tmp_path / "cache", "vol")
    assert loaded.pending == good
    assert f"{len(bad)} entries are not handles deltavault makes" in loaded.note


# ---------------------------------------------------------------- parent trees

class _Trees:
    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.loads = 0

    def add(self, nodes: list[Node]) -> bytes:
        raw = msgspec.msgpack.encode(Tree(nodes))
        tid = blake3.blake3(raw).digest()
        self.blobs[tid] = raw
        return tid

    def load_blob(self, blob_id: bytes) -> bytes:
        self.loads += 1
        return self.blobs[blob_id]


def test_tree_previous_reaches_depth_5000_without_recursing() -> None:
    trees = _Trees()
    tid = trees.add([Node(name=b"leaf", type=NodeType.FILE, size=7)])
    for _ in range(5000):
        tid = trees.add([Node(name=b"d", type=NodeType.DIR, subtree=tid)])
    prev = TreePrevious(trees, tid, "snap", 0)
    deep = b"/".join([b"d"] * 5000)
    assert sys.getrecursionlimit() < 5000
    got = prev.dir(deep)
    assert got is not None and list(got.nodes) == [b"leaf"]
    assert trees.loads == 5001
    assert prev.dir(deep + b"/missing") is None
    assert prev.dir(b"d/d/nothere/d") is None


def test_tree_previous_bounds_what_it_holds_but_keeps_ancestors() -> None:
    """Walked depth first, as the archiver does: every tree is loaded once, and no more
    than the budget (plus the current path) stays in memory."""
    trees = _Trees()
    wide = 50

    def level(depth: int) -> bytes:
        if depth == 0:
            return trees.add([Node(name=b"f%d" % i, type=NodeType.FILE) for i in range(wide)])
        sub = level(depth - 1)
        return trees.add([Node(name=b"s%d" % i, type=NodeType.DIR, subtree=sub) for i in range(3)]
                         + [Node(name=b"f%d" % i, type=NodeType.FILE) for i in range(wide)])

    prev = TreePrevious(trees, level(4), "snap", 0)
    prev.CACHE_NODES = 200
    visited = 0
    stack = [b""]
    while stack:
        rel = stack.pop()
        pdir = prev.dir(rel)
        assert pdir is not None
        visited += 1
        assert prev._cached_nodes <= prev.CACHE_NODES + 5 * (wide + 3)
        stack.extend(f"{rel.decode()}/{n.decode()}".lstrip("/").encode()
                     for n, node in pdir.nodes.items() if node.type == NodeType.DIR)
    assert visited == 1 + 3 + 9 + 27 + 81
    assert trees.loads == visited
