"""Pieces of sync that need no file system: filters, page comparison, the log format."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deltavault.sync.filters import Filter
from deltavault.sync.local.delta import PAGE, changed_runs
from deltavault.sync.report import SyncLog, SyncStats


def test_filter_names_paths_and_defaults() -> None:
    f = Filter(["*.tmp", "/build", "cache/"], [])
    assert f.excluded(b"a/b/x.tmp", b"x.tmp")
    assert f.excluded(b"build", b"build") and not f.excluded(b"src/build", b"build")
    assert f.excluded(b"a/cache", b"cache")  # a trailing slash is dropped; matches the name anywhere
    for name in (b"$RECYCLE.BIN", b"$Recycle.Bin", b"System Volume Information", b".deltavault-snapshots"):
        assert f.excluded(name, name)  # only at the root, any case
        assert not f.excluded(b"sub/" + name, name)
    assert not Filter([], [], default_excludes=False).excluded(b"$RECYCLE.BIN", b"$RECYCLE.BIN")


def test_filter_includes() -> None:
    f = Filter([], ["*.txt", "/docs"])
    assert f.has_includes
    assert f.included(b"a/b.txt", b"b.txt") and f.included(b"docs", b"docs")
    assert not f.included(b"a/b.bin", b"b.bin")
    raw = Filter(["caf\udce9*"], [])  # a non-UTF-8 pattern from the command line (surrogateescape)
    assert raw.excluded(b"caf\xe9-latin1", b"caf\xe9-latin1")


def test_changed_runs_merges_adjacent_pages_and_counts_growth() -> None:
    old = bytearray(os.urandom(10 * PAGE))
    new = bytearray(old)
    new[PAGE * 2 + 5] ^= 1
    new[PAGE * 3] ^= 1
    new[PAGE * 7 + 100] ^= 1
    assert changed_runs(new, old, len(new), len(old)) == [(2 * PAGE, 4 * PAGE), (7 * PAGE, 8 * PAGE)]
    grown = new + b"tail"
    assert changed_runs(grown, old, len(grown), len(old))[-1] == (10 * PAGE, 10 * PAGE + 4)
    # the last page partly beyond the old end counts as changed
    assert changed_runs(old, old, 10 * PAGE, 10 * PAGE - 1) == [(9 * PAGE, 10 * PAGE)]
    assert changed_runs(old, bytearray(old), len(old), len(old)) == []


def test_log_line_format(tmp_path: Path) -> None:
    log = SyncLog(tmp_path / "l")
    log.write("delta", 100, b"dir/new\nline\xff", written=4096, digest=b"\x01\x02")
    log.write("error", 0, b"x", error="unreadable: Permission denied")
    log.close()
    rows = [ln.split("\t") for ln in (tmp_path / "l").read_text().splitlines()]
    assert rows[0][1:] == ["delta", "100", "4096", "0102", "dir/new\\nline\\xff", "-"]
    assert rows[1][1:] == ["error", "0", "0", "-", "x", "unreadable: Permission denied"]


def test_stats_add() -> None:
    a, b = SyncStats(files_new=1, bytes_copied=5), SyncStats(files_new=2, delta_bytes_written=7)
    a.add(b)
    assert a.files_new == 3 and a.bytes_written == 12


def test_shard_depth_picks_a_level_with_enough_directories(tmp_path: Path) -> None:
    from deltavault.sync.local.shards import shard_depth

    for a in range(3):
        for b in range(40):
            (tmp_path / f"a{a}/b{b:02}").mkdir(parents=True)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert shard_depth(fd, 2, lambda rel, name: False) == 2  # 120 dirs at depth 2
        assert shard_depth(fd, 2, lambda rel, name: name == b"a1" or name.startswith(b"b")) == 1
        assert shard_depth(fd, 2, lambda rel, name: True) is None
    finally:
        os.close(fd)


def test_bufsize_option_units() -> None:
    import argparse

    import pytest

    from deltavault.cli.cmd_sync import _mb

    assert _mb("1") == 1 << 20 and _mb("256K") == 256 << 10 and _mb("2MiB") == 2 << 20
    for bad in ("0", "2K", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            _mb(bad)


def test_mountinfo_fields_are_unescaped() -> None:
    from deltavault.fs.mounts import _below, parse_mountinfo

    line = "36 35 98:0 /sub\\040dir /mnt/with\\040space\\011tab\\134back rw,noatime - ext4 /dev/root rw"
    (m,) = parse_mountinfo(line)
    assert (m.mount_id, m.device, m.root, m.mount_point) == (36, "98:0", "/sub dir", "/mnt/with space\ttab\\back")
    assert m.fstype == "ext4" and m.source == "/dev/root" and m.writable
    # a mount's root below another's: the rest of the path, else None
    assert _below(b"/", b"/a/b") == b"a/b" and _below(b"/a", b"/a/b/c") == b"b/c"
    assert _below(b"/a", b"/ab/c") is None and _below(b"/a", b"/a") is None and _below(b"/", b"/") is None


def test_agent_checks_every_component_of_a_path_once() -> None:
    import pytest

    from deltavault.errors import CorruptionError
    from deltavault.sync.wire import Paths

    check = Paths()
    deep = b"/".join([b"d"] * 3000)
    assert check(deep) == deep  # (component by component: its parents were not seen)
    assert check(deep + b"/e") == deep + b"/e"
    for bad in (b"..", b"a/../b", b"a//b", b"/abs", b"a/", b"x\0y", deep + b"/..", "str"):
        with pytest.raises(CorruptionError):
            check(bad)


def test_guard_decides_overlap_by_identity_alone() -> None:
    import pytest

    from deltavault.errors import UsageError
    from deltavault.sync.guard import Guard

    root, parent, src, inside, elsewhere = (1, 2), (1, 3), (1, 4), (1, 5), (1, 6)
    src_up = frozenset({src, parent, root})

    def check(dst: tuple[int, int], dst_up: set[tuple[int, int]]) -> str:
        try:
            Guard(src, src_up, dst, frozenset(dst_up | {dst})).check(b"/s", b"/d")
        except UsageError as exc:
            return exc.message
        return "ok"

    assert "is the source" in check(src, set(src_up))
    assert "is inside the source" in check(inside, {src, parent, root})  # e.g. a bind of SRC/b
    assert "contains the source" in check(parent, {root})  # e.g. a bind of SRC's parent
    assert check(elsewhere, {parent, root}) == "ok"  # a sibling of SRC
    assert check(elsewhere, set()) == "ok"
    Guard(src, src_up, None, frozenset()).check(b"/s", b"host:/d")  # DST on another host: nothing to judge
    with pytest.raises(UsageError, match="source and destination overlap"):
        Guard(src, src_up, src, src_up).check(b"/s", b"/d")


def test_remove_entry_is_iterative_and_bounded(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A tree deeper than the fd budget and than Python's recursion limit is removed whole,
    children reported first."""
    import sys

    import deltavault.sync.receiver.remove as remove

    monkeypatch.setattr(remove, "MAX_OPEN_DIRS", 2)
    depth = sys.getrecursionlimit() + 100
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(depth):
        os.mkdir(b"d", dir_fd=fd)
        os.close(os.open(b"f%d" % i, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        nfd = os.open(b"d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    removed: list[bytes] = []
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove.remove_entry(root, b"d", b"d", lambda rel, st: removed.append(rel))
    finally:
        os.close(root)
    assert sorted(os.listdir(tmp_path)) == ["f0"]
    assert len(removed) == 2 * depth - 1 and removed[-1] == b"d"
    assert removed.index(b"d/d") < removed.index(b"d")  # children first


def test_open_regular_opens_only_regular_files(tmp_path: Path) -> None:
    """A FIFO, a device node, a symlink or a directory swapped in under a file's name is
    refused from its O_PATH handle, never opened (a FIFO would block, a device may act)."""
    import stat as stat_mod

    from deltavault.fs.dirfd import NotRegular, open_regular

    (tmp_path / "file").write_bytes(b"content")
    os.mkfifo(tmp_path / "fifo")
    os.mknod(tmp_path / "dev", stat_mod.S_IFCHR | 0o600, os.makedev(1, 3))
    os.symlink("file", tmp_path / "link")
    (tmp_path / "dir").mkdir()
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = open_regular(dfd, b"file")
        assert os.read(fd, 100) == b"content"
        os.close(fd)
        for name in (b"fifo", b"dev", b"link", b"dir"):
            with pytest.raises(NotRegular):
                open_regular(dfd, name)
    finally:
        os.close(dfd)


def test_chunks_tile_the_file_with_its_holes_and_see_it_shrink(tmp_path: Path) -> None:
    """The one reader of file bytes both sides use (the local copy and the sender's stream):
    data and holes in order, covering the file exactly; a file cut short while it is read
    is SourceChanged, not a short copy."""
    from deltavault.sync.data import SourceChanged, chunks

    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.write(b"a" * 5000)
        f.seek(3 << 20)
        f.write(b"b" * 7000)
        f.truncate(6 << 20)  # a trailing hole
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        buf = memoryview(bytearray(1 << 20))
        pos, out = 0, bytearray()
        for off, n, data in chunks(fd, st, buf):
            assert off == pos and n > 0
            out += bytes(data) if data is not None else bytes(n)
            pos += n
        assert pos == st.st_size and bytes(out) == path.read_bytes()
    finally:
        os.close(fd)
    dense = tmp_path / "dense"
    dense.write_bytes(os.urandom(3 << 20))
    fd = os.open(dense, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        os.truncate(dense, 1 << 20)  # shrinks under the reader
        with pytest.raises(SourceChanged):
            for _ in chunks(fd, st, buf):
                pass
    finally:
        os.close(fd)


def test_chunks_of_a_file_of_many_extents_hold_none_of_them(tmp_path: Path) -> None:
    """A file whose owner wrote every other page (20,000 data extents here; millions cost
    only disk) was sent after a list of all its extents was built: about 128 bytes each,
    2.4 MiB here, 1.7 GiB for the 14 million of 56 GiB written. They are found one at a
    time now; the holes are still holes."""
    import tracemalloc

    from deltavault.sync.data import chunks

    path = tmp_path / "striped"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for i in range(20_000):
            os.pwrite(fd, b"x" * PAGE, 2 * i * PAGE)
        st = os.fstat(fd)
        buf = memoryview(bytearray(1 << 20))
        holes = data = 0
        tracemalloc.start()
        try:
            for _off, n, got in chunks(fd, st, buf):
                holes += got is None
                data += n if got is not None else 0
            _now, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        os.close(fd)
    assert (holes, data) == (19_999, 20_000 * PAGE)
    assert peak < 256 * 1024, peak


def test_a_temp_name_is_removed_when_the_block_making_it_fails(tmp_path: Path) -> None:
    from deltavault.sync.receiver.temps import TEMP_PREFIX, Temps

    temps = Temps()
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError), temps.made((b"", None), dfd, b"name") as tmp:
            os.symlink(b"target", tmp, dir_fd=dfd)
            os.rename(tmp, b"missing/name", src_dir_fd=dfd, dst_dir_fd=dfd)  # fails: no such directory
        with temps.made((b"", None), dfd, b"kept") as tmp:
            os.symlink(b"target", tmp, dir_fd=dfd)
            os.rename(tmp, b"kept", src_dir_fd=dfd, dst_dir_fd=dfd)
        left = temps.new((b"", None), b"left")  # registered, then made; the run is interrupted
        os.symlink(b"target", left, dir_fd=dfd)
        temps.remove_all(dfd)
    finally:
        os.close(dfd)
    assert sorted(os.listdir(tmp_path)) == ["kept"]
    assert not any(n.startswith(TEMP_PREFIX.decode()) for n in os.listdir(tmp_path))


def test_entry_win_field_round_trips_and_is_checked() -> None:
    """Feature "ntfs": an entry's 12th field, through msgpack as on the wire; 11 fields
    (an older sender) still read; a malformed one is the sender's corruption."""
    import msgspec

    from deltavault.errors import CorruptionError
    from deltavault.fs.ntfs import ReadResult
    from deltavault.sync.wire import Entry, entry, win_wire

    st = os.stat(__file__)
    meta = ReadResult(b"\x01sd", "S-1-5-18", 0x20, b"t" * 32, b"", [b"big", b"small"])
    raw = entry(b"f", "f", st, win=win_wire(meta, streams={b"big": 5 << 20, b"small": 10}, lost=["x"],
                                          inline={b"s": b"v"}))
    e = Entry(msgspec.msgpack.decode(msgspec.msgpack.encode(raw)))
    assert e.win is not None and e.win.meta.sd == b"\x01sd" and e.win.meta.attrib == 0x20
    assert e.win.streams == {b"big": 5 << 20, b"small": 10} and e.win.lost == ["x"] and e.win.inline == {b"s": b"v"}
    assert Entry(entry(b"f", "f", st)).win is None
    bad = [*entry(b"f", "f", st), {"sd": "not bytes", "attrib": None, "times": b"", "reparse": b""}]
    with pytest.raises(CorruptionError):
        Entry(bad)
    with pytest.raises(CorruptionError):
        Entry([*entry(b"f", "f", st), None, None])  # 13 fields
