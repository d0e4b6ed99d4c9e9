"""sync --acl --streams from an ntfs-3g mount: onto another ntfs-3g mount byte for byte,
onto ext4 with the log naming what could not be kept."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from deltavault.fs.ntfs import ARCHIVE, HIDDEN, READONLY, SYSTEM
from tests.conftest import needs_root, needs_tools
from tests.integration.ntfs.ntfsutil import ntfs, ntfs_view, streams_of
from tests.integration.sync.conftest import dv, summary

pytestmark = [needs_root(), needs_tools("mkntfs", "ntfs-3g", "getfattr")]

BIG = 5 * 1024 * 1024
ENTRIES = ["data", "data/doc.txt", "data/readonly.txt", "data/sub"]


def populate(root: Path) -> None:
    d = root / "data"
    d.mkdir()
    f = d / "doc.txt"
    f.write_text("hello\n")
    sd = os.getxattr(f, "system.ntfs_acl")
    os.setxattr(f, "system.ntfs_acl", sd.replace(bytes.fromhex("ff011f00"), bytes.fromhex("89001200")))
    (d / "doc.txt:small").write_bytes(b"0123456789")
    (d / "doc.txt:big").write_bytes(os.urandom(BIG))
    os.setxattr(f, "system.ntfs_crtime", struct.pack("<Q", 130_000_000_000_000_000))
    os.setxattr(f, "system.ntfs_attrib", struct.pack("<I", HIDDEN | SYSTEM | ARCHIVE))
    (d / "readonly.txt").write_text("ro\n")
    os.setxattr(d / "readonly.txt", "system.ntfs_attrib", struct.pack("<I", READONLY | ARCHIVE))
    (d / "sub").mkdir()
    os.setxattr(d / "sub", "system.ntfs_attrib", struct.pack("<I", HIDDEN | 0x10))


def test_sync_ntfs_to_ntfs(tmp_path: Path) -> None:
    with ntfs(tmp_path, "src") as src:
        populate(src)
    with ntfs(tmp_path, "src", options="noatime") as src, ntfs(tmp_path, "dst") as dst:
        before = {e: ntfs_view(src, e) for e in ENTRIES}
        want = streams_of(src / "data" / "doc.txt")
        r = dv("--json", "sync", str(src / "data"), str(dst / "data"), "--acl", "--streams", "--verify")
        assert r.returncode == 0, r.stdout + r.stderr
        assert summary(r)["ntfs_not_kept"] == 0
        # --verify read the streams back too: the two files and their 10 + 5 MiB of streams
        assert summary(r)["bytes_verified"] == len("hello\n") + len("ro\n") + 10 + BIG, summary(r)
        # Only the descriptor changes (the ctime alone moves): the next run sets it again.
        f = src / "data" / "readonly.txt"
        sd = os.getxattr(f, "system.ntfs_acl")
        os.setxattr(f, "system.ntfs_acl", sd.replace(bytes.fromhex("ff011f00"), bytes.fromhex("a9001200")))
        before["data/readonly.txt"] = ntfs_view(src, "data/readonly.txt")
        r2 = dv("--json", "sync", str(src / "data"), str(dst / "data"), "--acl", "--streams")
        assert r2.returncode == 0, r2.stdout + r2.stderr
        assert summary(r2)["bytes_copied"] == 0
    with ntfs(tmp_path, "dst") as dst:
        after = {e: ntfs_view(dst, e.replace("data", "data", 1)) for e in ENTRIES}
        assert streams_of(dst / "data" / "doc.txt") == want
    for e in ENTRIES:
        assert after[e] == before[e], e


def assert_named_what_ext4_did_not_keep(r: CompletedProcess[str], dst: Path, log: Path) -> None:
    """``populate``'s tree synced onto ext4: small streams kept as xattrs, and the log names,
    entry by entry, what ext4 could not keep."""
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(r)
    assert s["ntfs_not_kept"] == 4, s  # data, doc.txt, readonly.txt, sub
    assert os.getxattr(dst / "doc.txt", "user.small") == b"0123456789"
    lines = {ln.split("\t")[5]: ln.split("\t")[6] for ln in log.read_text().splitlines()}
    assert lines["doc.txt"] == ("NTFS not kept on DST: stream big (5242880 bytes), security descriptor, "
                                "DOS attributes, creation time"), lines
    assert lines["sub"].startswith("NTFS not kept on DST: security descriptor, DOS attributes"), lines


def test_sync_ntfs_to_ext4_names_what_it_could_not_keep(tmp_path: Path) -> None:
    with ntfs(tmp_path, "src") as src:
        populate(src)
        dst = tmp_path / "ext4"  # tmp_path is on the root file system: ext4 on this VM
        log = tmp_path / "sync.log"
        r = dv("--json", "sync", str(src / "data"), str(dst), "--acl", "--streams", "--log", str(log))
    assert_named_what_ext4_did_not_keep(r, dst, log)
    text = dv("sync", str(tmp_path / "ext4"), str(tmp_path / "ext4b"), "--acl", "--streams")
    assert text.returncode == 0  # not NTFS: nothing said


def test_xattrs_from_ntfs_leave_the_stream_list_alone(tmp_path: Path) -> None:
    """ntfs-3g lists ``ntfs.streams.list`` as an xattr of some files (not of all: not of this
    one on ntfs-3g 2022.10.3, seen on others): --xattrs does not try to copy it (no file
    system takes it); --streams copies the streams it names."""
    with ntfs(tmp_path, "src") as src:
        (src / "d").mkdir()
        (src / "d" / "f").write_text("f")
        (src / "d" / "f:s").write_bytes(b"s")
        r = dv("--json", "sync", str(src / "d"), str(tmp_path / "out"), "--xattrs", "--streams")
        assert r.returncode == 0, r.stdout + r.stderr
        assert summary(r)["problems"] == []
        assert os.getxattr(tmp_path / "out" / "f", "user.s") == b"s"
        # Again, nothing changed: the streams kept as xattrs are SRC's, not extras to remove.
        r = dv("--json", "sync", str(src / "d"), str(tmp_path / "out"), "--xattrs", "--streams")
        assert r.returncode == 0, r.stdout + r.stderr
        assert (summary(r)["files_same"], summary(r)["meta_fixed"]) == (1, 0), summary(r)
        assert os.getxattr(tmp_path / "out" / "f", "user.s") == b"s"
        # The stream changes (and the file's mtime with it): the xattr follows.
        (src / "d" / "f:s").write_bytes(b"changed")
        r = dv("--json", "sync", str(src / "d"), str(tmp_path / "out"), "--streams")
        assert r.returncode == 0, r.stdout + r.stderr
    assert os.getxattr(tmp_path / "out" / "f", "user.s") == b"changed"


def test_worker_processes_carry_ntfs_metadata(tmp_path: Path) -> None:
    """Subtrees synced by forked workers (--processes) get the same as the main process's."""
    with ntfs(tmp_path, "src") as src:
        for i in range(4):
            sub = src / "data" / f"sub{i}"
            sub.mkdir(parents=True)
            (sub / "f").write_text(str(i))
            Path(f"{sub / 'f'}:s").write_bytes(b"stream %d" % i)
            os.setxattr(sub / "f", "system.ntfs_attrib", struct.pack("<I", HIDDEN | ARCHIVE))
            os.setxattr(sub, "system.ntfs_attrib", struct.pack("<I", HIDDEN | 0x10))  # a worker's root
    names = [f"sub{i}{f}" for i in range(4) for f in ("", "/f")]
    with ntfs(tmp_path, "src", options="noatime") as src, ntfs(tmp_path, "dst") as dst:
        before = {n: ntfs_view(src / "data", n) for n in names}
        r = dv("--json", "sync", str(src / "data"), str(dst / "data"), "--acl", "--streams", "--processes", "2")
        assert r.returncode == 0, r.stdout + r.stderr
        assert summary(r)["workers"] >= 1, summary(r)
    with ntfs(tmp_path, "src", options="noatime") as src, ntfs(tmp_path, "dst") as dst:
        for n in names:
            assert ntfs_view(dst / "data", n) == before[n], n
        for i in range(4):
            assert Path(f"{dst / 'data' / f'sub{i}' / 'f'}:s").read_bytes() == b"stream %d" % i
        r = dv("--json", "sync", str(src / "data"), str(tmp_path / "ext4"), "--acl", "--streams", "--processes", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert summary(r)["workers"] >= 1 and summary(r)["ntfs_not_kept"] == 9, summary(r)  # 4 files, 5 dirs
    assert os.getxattr(tmp_path / "ext4" / "sub3" / "f", "user.s") == b"stream 3"


def test_stream_of_a_file_renamed_over_is_read_fresh(tmp_path: Path) -> None:
    """The kernel keeps a stream's pages under the name ``f:s``: once another file is
    renamed over ``f``, reading ``f:s`` gave the old file's stream (silently: a wrong copy)
    until they were dropped."""
    with ntfs(tmp_path, "src") as src, ntfs(tmp_path, "dst") as dst:
        (src / "d").mkdir()
        (src / "d" / "f").write_text("f")
        Path(f"{src / 'd' / 'f'}:s").write_bytes(b"old stream")
        r = dv("--json", "sync", str(src / "d"), str(dst / "d"), "--streams")
        assert r.returncode == 0, r.stdout + r.stderr
        (src / "d" / ".t").write_text("g")
        Path(f"{src / 'd' / '.t'}:s").write_bytes(b"new stream")
        os.rename(src / "d" / ".t", src / "d" / "f")
        r = dv("--json", "sync", str(src / "d"), str(dst / "d"), "--streams")
        assert r.returncode == 0, r.stdout + r.stderr
    with ntfs(tmp_path, "dst") as dst:
        assert Path(f"{dst / 'd' / 'f'}:s").read_bytes() == b"new stream"


def test_changed_stream_alone_is_synced(tmp_path: Path) -> None:
    """Only a stream changed (the file's own data is the same, its mtime moved): the file
    is not kept as it was, its streams are copied again."""
    with ntfs(tmp_path, "src") as src, ntfs(tmp_path, "dst") as dst:
        (src / "d").mkdir()
        (src / "d" / "f").write_text("same data")
        Path(f"{src / 'd' / 'f'}:s").write_bytes(b"version 1")
        r = dv("--json", "sync", str(src / "d"), str(dst / "d"), "--streams")
        assert r.returncode == 0, r.stdout + r.stderr
        Path(f"{src / 'd' / 'f'}:s").write_bytes(b"version 2")
        r = dv("--json", "sync", str(src / "d"), str(dst / "d"), "--streams")
        assert r.returncode == 0, r.stdout + r.stderr
    with ntfs(tmp_path, "dst") as dst:
        assert Path(f"{dst / 'd' / 'f'}:s").read_bytes() == b"version 2"


@pytest.mark.parametrize("processes", ["1", "2"])
def test_directory_streams_are_synced(tmp_path: Path, processes: str) -> None:
    """Streams of directories (``dir:stream``): onto NTFS made SRC's (written, rewritten when
    changed, removed when gone), onto ext4 as ``user.`` xattrs up to 64 KiB, the bigger one
    named in the log; in the main process and in worker processes alike."""
    with ntfs(tmp_path, "src") as src, ntfs(tmp_path, "dst") as dst:
        top = src / "data"
        (top / "sub" / "deeper").mkdir(parents=True)
        (top / "sub" / "deeper" / "f").write_text("f")
        Path(f"{top / 'sub'}:small").write_bytes(b"0123456789")
        Path(f"{top / 'sub'}:big").write_bytes(os.urandom(BIG))
        Path(f"{top / 'sub' / 'deeper'}:s").write_bytes(b"deeper")
        flags = ["--streams", "--acl", "--processes", processes]
        r = dv("--json", "sync", str(top), str(dst / "data"), *flags)
        assert r.returncode == 0, r.stdout + r.stderr
        for d in ("sub", "sub/deeper"):
            assert streams_of(dst / "data" / d) == streams_of(top / d), d
        Path(f"{top / 'sub'}:small").write_bytes(b"changed")
        os.unlink(f"{top / 'sub'}:big")
        Path(f"{top / 'sub'}:new").write_bytes(b"new")
        r = dv("--json", "sync", str(top), str(dst / "data"), *flags)
        assert r.returncode == 0, r.stdout + r.stderr
        assert summary(r)["problems"] == [], summary(r)
        want = {"small": b"changed", "new": b"new"}
        Path(f"{top / 'sub'}:big").write_bytes(os.urandom(BIG))
        log = tmp_path / "sync.log"
        r = dv("--json", "sync", str(top), str(tmp_path / "ext4"), *flags, "--log", str(log))
        assert r.returncode == 0, r.stdout + r.stderr
    with ntfs(tmp_path, "dst") as dst:
        assert streams_of(dst / "data" / "sub") == want
        assert streams_of(dst / "data" / "sub" / "deeper") == {"s": b"deeper"}
    sub = tmp_path / "ext4" / "sub"
    assert os.getxattr(sub, "user.small") == b"changed" and os.getxattr(sub, "user.new") == b"new"
    assert "user.big" not in os.listxattr(sub)
    assert os.getxattr(sub / "deeper", "user.s") == b"deeper"
    notes = [ln.split("\t")[6] for ln in log.read_text().splitlines() if ln.split("\t")[5] == "sub"]
    assert any(n.startswith(f"NTFS not kept on DST: stream big ({BIG} bytes)") for n in notes), notes
    # data, sub, deeper and f (descriptors, attributes, times), sub once for those and its big stream
    assert summary(r)["ntfs_not_kept"] == 4, summary(r)


def _dump_streams(root: Path, rel: str) -> str:
    """A file's streams as getfattr dumps them, on its volume mounted again with
    streams_interface=xattr (each stream the xattr user.NAME)."""
    r = subprocess.run(["getfattr", "--absolute-names", "-d", "-e", "hex", "-m", r"^user\.", str(root / rel)],
                       capture_output=True, text=True, check=True)
    return "\n".join(r.stdout.splitlines()[1:]).strip()


@pytest.mark.parametrize("interface", ["windows", "xattr"])
def test_stream_change_with_mtime_set_back_is_synced(tmp_path: Path, interface: str) -> None:
    """A stream added, rewritten in place (same size) or removed, each time with the file's
    mtime set back by ``touch -d``; and a stream removed with no touch at all (which moves
    no time of its file on ntfs-3g): the file's size and mtime equal DST's, yet each run
    copies it, and DST's streams are SRC's, compared through getfattr. SRC is mounted with
    either streams interface; DST with the windows one. An unchanged run copies nothing."""
    stamp = "2020-01-02 03:04:05.123456700 UTC"

    def put(f: Path, s: str, data: bytes) -> None:
        if interface == "windows":
            with open(f"{f}:{s}", "r+b" if os.path.exists(f"{f}:{s}") else "wb") as h:
                h.write(data)
        else:
            os.setxattr(f, f"user.{s}", data)

    def drop(f: Path, s: str) -> None:
        if interface == "windows":
            os.unlink(f"{f}:{s}")
        else:
            os.removexattr(f, f"user.{s}")

    changes = [("added", lambda f: put(f, "new", b"a new stream"), True, {"s": b"x" * 100, "new": b"a new stream"}),
               ("rewritten", lambda f: put(f, "s", b"X" * 100), True, {"s": b"X" * 100, "new": b"a new stream"}),
               ("removed", lambda f: drop(f, "new"), True, {"s": b"X" * 100}),
               ("removed, no touch", lambda f: drop(f, "s"), False, {})]
    with ntfs(tmp_path, "src", streams=interface) as src, ntfs(tmp_path, "dst") as dst:
        (src / "d").mkdir()
        f = src / "d" / "f"
        f.write_text("same data")
        put(f, "s", b"x" * 100)
        (src / "d" / "other").write_text("other")
        subprocess.run(["touch", "-d", stamp, str(f)], check=True)
        r = dv("--json", "sync", str(src / "d"), str(dst / "d"), "--streams")
        assert r.returncode == 0, r.stdout + r.stderr
    for what, change, touch, want in changes:
        with ntfs(tmp_path, "src", streams=interface) as src, ntfs(tmp_path, "dst") as dst:
            f = src / "d" / "f"
            mtime = f.stat().st_mtime_ns
            change(f)
            if touch:
                subprocess.run(["touch", "-d", stamp, str(f)], check=True)
            assert (f.stat().st_mtime_ns, f.stat().st_size) == (mtime, 9), what
            r = dv("--json", "sync", str(src / "d"), str(dst / "d"), "--streams")
            assert r.returncode == 0, r.stdout + r.stderr
            s = summary(r)
            assert (s["files_updated"], s["files_same"], s["problems"]) == (1, 1, []), (what, s)
        with ntfs(tmp_path, "src", streams="xattr") as src, ntfs(tmp_path, "dst", streams="xattr") as dst:
            dump = _dump_streams(dst, "d/f")
            assert dump == _dump_streams(src, "d/f"), (what, dump)
            assert dump == "\n".join(f"user.{k}=0x{v.hex()}" for k, v in sorted(want.items())), (what, dump)
    with ntfs(tmp_path, "src", streams=interface) as src, ntfs(tmp_path, "dst") as dst:
        r = dv("--json", "sync", str(src / "d"), str(dst / "d"), "--streams")  # nothing changed: nothing copied
        assert summary(r)["bytes_copied"] == 0 and summary(r)["files_same"] == 2, summary(r)


@pytest.mark.parametrize("interface", ["windows", "xattr"])
def test_checksum_compares_streams(tmp_path: Path, interface: str) -> None:
    """A stream rewritten in place (same size, mtime set back), and then DST's file touched
    (its ctime moves past SRC's): size, mtime, stream names and sizes and ctimes all say
    "unchanged", so a plain run keeps DST's file (the limit of what metadata tells);
    --checksum compares the streams' bytes too and copies it."""
    stamp = "2020-01-02 03:04:05 UTC"
    with ntfs(tmp_path, "src", streams=interface) as src, ntfs(tmp_path, "dst") as dst:
        (src / "d").mkdir()
        f = src / "d" / "f"
        f.write_text("same data")
        if interface == "windows":
            Path(f"{f}:s").write_bytes(b"x" * 100)
        else:
            os.setxattr(f, "user.s", b"x" * 100)
        subprocess.run(["touch", "-d", stamp, str(f)], check=True)
        r = dv("--json", "sync", str(src / "d"), str(dst / "d"), "--streams")
        assert r.returncode == 0, r.stdout + r.stderr
        if interface == "windows":
            with open(f"{f}:s", "r+b") as h:
                h.write(b"Y")
        else:
            os.setxattr(f, "user.s", b"Y" + b"x" * 99)
        subprocess.run(["touch", "-d", stamp, str(f)], check=True)
        subprocess.run(["touch", "-d", stamp, str(dst / "d" / "f")], check=True)  # DST's ctime: now
        r = dv("--json", "sync", str(src / "d"), str(dst / "d"), "--streams")
        assert summary(r)["files_same"] == 1, summary(r)
        assert Path(f"{dst / 'd' / 'f'}:s").read_bytes() == b"x" * 100
        r = dv("--json", "sync", str(src / "d"), str(dst / "d"), "--streams", "--checksum")
        assert r.returncode == 0, r.stdout + r.stderr
        assert (summary(r)["files_updated"], summary(r)["problems"]) == (1, []), summary(r)
        assert Path(f"{dst / 'd' / 'f'}:s").read_bytes() == b"Y" + b"x" * 99
        r = dv("--json", "sync", str(src / "d"), str(dst / "d"), "--streams", "--checksum")
        assert summary(r)["files_same"] == 1, summary(r)  # equal bytes: kept
