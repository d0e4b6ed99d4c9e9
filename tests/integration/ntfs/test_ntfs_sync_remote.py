"""sync --acl --streams with another host (the suite's sshd on 127.0.0.1, the real CLI and
OpenSSH at both ends): from an ntfs-3g mount onto another byte for byte, pushed and
pulled; onto ext4 with the log naming what could not be kept; a changed stream sent by
remote delta; --verify reading streams back. Compared through getfattr, as the local tests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deltavault.fs import ntfs as ntfsmod
from deltavault.sync.options import SyncOptions
from deltavault.sync.push import PushSyncer
from deltavault.sync.report import SyncResult
from deltavault.sync.ssh import RemotePath
from tests.conftest import needs_root, needs_tools
from tests.integration.ntfs.ntfsutil import ntfs, ntfs_view, streams_of
from tests.integration.ntfs.test_ntfs_sync import (
    BIG,
    ENTRIES,
    assert_named_what_ext4_did_not_keep,
    populate,
)
from tests.integration.sync.conftest import REMOTE, dv, summary
from tests.sshd import Server, missing_tools

pytestmark = [needs_root(), needs_tools("mkntfs", "ntfs-3g", "getfattr"), pytest.mark.root,
              pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")]


def sync(server: Server, how: str, src: Path, dst: Path, *flags: str):  # type: ignore[no-untyped-def]
    """A push (DST on the far side) or a pull (SRC on the far side), through the sshd."""
    s, d = (str(src), f"dvtest:{dst}") if how == "push" else (f"dvtest:{src}", str(dst))
    return dv("--json", "sync", "--remote-command", REMOTE, *flags, s, d,
              env={"DELTAVAULT_SSH_CONFIG": str(server.ssh_config)})


@contextmanager
def pushed_here(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: object, name: str,
                value: object) -> Iterator[tuple[SyncResult, Path, Path]]:
    """A populated ntfs-3g SRC pushed onto an ntfs-3g DST by a sender in this process, with
    ``target.name`` replaced by ``value`` while it runs; the mounts stay while the caller looks."""
    with ntfs(tmp_path, "src") as src, ntfs(tmp_path, "dst") as dst:
        populate(src)
        monkeypatch.setenv("DELTAVAULT_SSH_CONFIG", str(server.ssh_config))
        monkeypatch.setattr(target, name, value)
        res = PushSyncer(src / "data", RemotePath("dvtest", str(dst / "data")),
                         SyncOptions(acl=True, streams=True), remote=REMOTE).run()
        monkeypatch.undo()
        yield res, src, dst


@pytest.mark.parametrize("how", ["push", "pull"])
def test_ntfs_to_ntfs_over_ssh_is_byte_identical(server: Server, tmp_path: Path, how: str) -> None:
    with ntfs(tmp_path, "src") as src:
        populate(src)
    with ntfs(tmp_path, "src", options="noatime") as src, ntfs(tmp_path, "dst") as dst:
        before = {e: ntfs_view(src, e) for e in ENTRIES}
        want = streams_of(src / "data" / "doc.txt")
        r = sync(server, how, src / "data", dst / "data", "--acl", "--streams", "--verify")
        assert r.returncode == 0, r.stdout + r.stderr
        s = summary(r)
        assert s["ntfs_not_kept"] == 0 and s["problems"] == [], s
        # --verify read the streams back too: the two files and their 10 + 5 MiB of streams
        assert s["bytes_verified"] == len("hello\n") + len("ro\n") + 10 + BIG, s
        # Nothing changed: nothing is sent again.
        r = sync(server, how, src / "data", dst / "data", "--acl", "--streams")
        assert r.returncode == 0, r.stdout + r.stderr
        assert summary(r)["bytes_written"] == 0 and summary(r)["wire_sent"] < 64 << 10, summary(r)
    with ntfs(tmp_path, "dst") as dst:
        after = {e: ntfs_view(dst, e) for e in ENTRIES}
        assert streams_of(dst / "data" / "doc.txt") == want
    for e in ENTRIES:
        assert after[e] == before[e], e


@pytest.mark.parametrize("how", ["push", "pull"])
def test_ntfs_to_ext4_over_ssh_names_what_it_could_not_keep(server: Server, tmp_path: Path, how: str) -> None:
    log = tmp_path / "sync.log"
    dst = tmp_path / "ext4"  # tmp_path is on the root file system: ext4 on this VM
    with ntfs(tmp_path, "src") as src:
        populate(src)
        r = sync(server, how, src / "data", dst, "--acl", "--streams", "--log", str(log))
    assert_named_what_ext4_did_not_keep(r, dst, log)


@pytest.mark.parametrize("how", ["push", "pull"])
def test_changed_stream_travels_by_delta(server: Server, tmp_path: Path, how: str) -> None:
    """Three 4 KiB pages of a 5 MiB stream change, twice: the file's own data is unchanged
    (its size too; only its mtime moved), and what crosses the wire is about those pages.
    The second time, DST's stream is the one the first run renamed into place, while the
    kernel still caches the pages it read of the stream before (ntfs-3g gives streams no
    inode of their own): they must not be taken as the old version."""
    with ntfs(tmp_path, "src") as src:
        populate(src)
    with ntfs(tmp_path, "src", options="noatime") as src, ntfs(tmp_path, "dst") as dst:
        r = sync(server, how, src / "data", dst / "data", "--acl", "--streams")
        assert r.returncode == 0, r.stdout + r.stderr
        big = Path(f"{src / 'data' / 'doc.txt'}:big")
        for round in range(2):
            with open(big, "r+b") as f:
                for off in (4096 * (round + 1), 2 << 20, BIG - 8192):
                    f.seek(off)
                    f.write(os.urandom(4096))
            r = sync(server, how, src / "data", dst / "data", "--acl", "--streams", "--verify")
            assert r.returncode == 0, r.stdout + r.stderr
            s = summary(r)
            assert s["problems"] == [] and s["delta_wire_bytes"] == 3 * 4096, (round, s["delta_wire_bytes"], s["problems"])
            wire = s["wire_sent"] if how == "push" else s["wire_received"]
            assert wire < 256 << 10, s  # far below the 5 MiB stream
    with ntfs(tmp_path, "src", options="noatime") as src, ntfs(tmp_path, "dst", options="noatime") as dst:
        for e in ENTRIES:
            assert ntfs_view(dst, e) == ntfs_view(src, e), e
        assert streams_of(dst / "data" / "doc.txt") == streams_of(src / "data" / "doc.txt")


def test_default_mount_over_ssh_says_what_it_cannot_read(server: Server, tmp_path: Path) -> None:
    """SRC mounted without streams_interface (ntfs-3g's default, xattr): the small stream
    travels (as a stream onto DST's windows interface), the one over 64 KiB cannot be read
    there, which the run names; the rest is synced."""
    with ntfs(tmp_path, "src") as src:
        populate(src)
    with ntfs(tmp_path, "src", streams=None) as src, ntfs(tmp_path, "dst") as dst:
        r = sync(server, "push", src / "data", dst / "data", "--acl", "--streams")
        assert r.returncode == 3, r.stdout + r.stderr
        problems = summary(r)["problems"]
        assert [(p["path"], p["kind"]) for p in problems] == [("doc.txt", "metadata")], problems
        assert "over 64 KiB" in problems[0]["message"] and "streams_interface=windows" in problems[0]["message"]
        assert streams_of(dst / "data" / "doc.txt") == {"small": b"0123456789"}
        assert (dst / "data" / "readonly.txt").read_text() == "ro\n"


def test_stream_name_too_long_for_ext4_is_named(server: Server, tmp_path: Path) -> None:
    """A stream whose name ext4 cannot take as an xattr name (``user.`` + 255 bytes): named,
    the file, its other stream and the other files synced."""
    long = "n" * 255
    with ntfs(tmp_path, "src") as src:
        (src / "d").mkdir()
        (src / "d" / "f").write_text("f")
        Path(f"{src / 'd' / 'f'}:{long}").write_bytes(b"long")
        Path(f"{src / 'd' / 'f'}:ok").write_bytes(b"ok")
        (src / "d" / "g").write_text("g")
        r = sync(server, "push", src / "d", tmp_path / "ext4", "--streams")
    assert r.returncode == 3, r.stdout + r.stderr
    problems = summary(r)["problems"]
    assert [(p["path"], p["kind"]) for p in problems] == [("f", "metadata")], problems
    assert long in problems[0]["message"], problems
    assert os.getxattr(tmp_path / "ext4" / "f", "user.ok") == b"ok"
    assert (tmp_path / "ext4" / "f").read_text() == "f" and (tmp_path / "ext4" / "g").read_text() == "g"


def test_descriptor_that_does_not_parse_over_ssh(server: Server, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A descriptor that does not parse (ntfs-3g refuses to set one, so the one read is
    replaced on its way out of the sender, which runs in this process): the sender names
    it, DST's ntfs-3g refuses it (named too), the files and their streams are synced."""
    garbage = b"\x07not a descriptor"
    real: Callable[[int | bytes, bytes], bytes | None] = ntfsmod._get

    def fake(target: int | bytes, name: bytes) -> bytes | None:
        return garbage if name == ntfsmod.ACL else real(target, name)

    with pushed_here(server, tmp_path, monkeypatch, ntfsmod, "_get", fake) as (res, src, dst):
        by_path: dict[str, list[str]] = {}
        for p in res.problems:
            assert p.kind == "metadata", p
            by_path.setdefault(p.path, []).append(p.message)
        assert sorted(by_path) == [".", "doc.txt", "readonly.txt", "sub"], by_path
        for path, messages in by_path.items():
            assert [m for m in messages if "kept as bytes, not understood" in m], (path, messages)
            assert [m for m in messages if m.startswith("NTFS security descriptor:")], (path, messages)
        assert streams_of(dst / "data" / "doc.txt") == streams_of(src / "data" / "doc.txt")
        assert (dst / "data" / "readonly.txt").read_text() == "ro\n"


@pytest.mark.parametrize("how", ["push", "pull"])
def test_directory_streams_over_ssh(server: Server, tmp_path: Path, how: str) -> None:
    """A directory's streams travel with its parent's listing: onto NTFS written, rewritten
    when changed, removed when gone; onto ext4 as ``user.`` xattrs, the one over 64 KiB named."""
    with ntfs(tmp_path, "src") as src, ntfs(tmp_path, "dst") as dst:
        top = src / "data"
        (top / "sub" / "deeper").mkdir(parents=True)
        (top / "sub" / "deeper" / "f").write_text("f")
        Path(f"{top / 'sub'}:small").write_bytes(b"0123456789")
        Path(f"{top / 'sub'}:big").write_bytes(os.urandom(200_000))
        Path(f"{top / 'sub' / 'deeper'}:s").write_bytes(b"deeper")
        r = sync(server, how, top, dst / "data", "--streams", "--acl")
        assert r.returncode == 0, r.stdout + r.stderr
        for d in ("sub", "sub/deeper"):
            assert streams_of(dst / "data" / d) == streams_of(top / d), d
        Path(f"{top / 'sub'}:small").write_bytes(b"changed")
        os.unlink(f"{top / 'sub'}:big")
        Path(f"{top / 'sub'}:new").write_bytes(b"new")
        r = sync(server, how, top, dst / "data", "--streams", "--acl")
        assert r.returncode == 0, r.stdout + r.stderr
        assert summary(r)["problems"] == [], summary(r)
        Path(f"{top / 'sub'}:big").write_bytes(os.urandom(200_000))
        log = tmp_path / "sync.log"
        r = sync(server, how, top, tmp_path / "ext4", "--streams", "--log", str(log))
        assert r.returncode == 0, r.stdout + r.stderr
    with ntfs(tmp_path, "dst") as dst:
        assert streams_of(dst / "data" / "sub") == {"small": b"changed", "new": b"new"}
        assert streams_of(dst / "data" / "sub" / "deeper") == {"s": b"deeper"}
    sub = tmp_path / "ext4" / "sub"
    assert os.getxattr(sub, "user.small") == b"changed" and os.getxattr(sub, "user.new") == b"new"
    assert "user.big" not in os.listxattr(sub) and os.getxattr(sub / "deeper", "user.s") == b"deeper"
    notes = [ln.split("\t")[6] for ln in log.read_text().splitlines() if ln.split("\t")[5] == "sub"]
    assert "NTFS not kept on DST: stream big (200000 bytes)" in notes, notes
    assert summary(r)["ntfs_not_kept"] == 1, summary(r)


# This deltavault as an older one: its feature list emptied before it starts (it then neither
# says "ntfs" in its hello nor reads NTFS metadata as a sender), for the tests only.
@pytest.mark.parametrize("how", ["push", "pull"])
def test_checksum_over_ssh_compares_streams(server: Server, tmp_path: Path, how: str) -> None:
    """A stream rewritten in place, its size kept and its file's mtime set back (``touch -d``):
    over ssh the two hosts' ctimes are not compared (two clocks), so a plain run keeps DST's
    file (docs/sync.md says so); --checksum sends the streams' digests with the file's and
    the agent compares them with DST's: the file is sent again, the next run keeps it."""
    stamp = "2020-01-02 03:04:05 UTC"
    with ntfs(tmp_path, "src") as src, ntfs(tmp_path, "dst") as dst:
        (src / "d").mkdir()
        f = src / "d" / "f"
        f.write_text("same data")
        Path(f"{f}:s").write_bytes(b"x" * 100)
        Path(f"{f}:big").write_bytes(b"b" * 200_000)
        (src / "d" / "other").write_text("other")
        subprocess.run(["touch", "-d", stamp, str(f)], check=True)
        r = sync(server, how, src / "d", dst / "d", "--streams")
        assert r.returncode == 0, r.stdout + r.stderr
        with open(f"{f}:big", "r+b") as h:
            h.seek(100_000)
            h.write(b"Y")
        subprocess.run(["touch", "-d", stamp, str(f)], check=True)
        r = sync(server, how, src / "d", dst / "d", "--streams")
        assert summary(r)["files_same"] == 2, summary(r)  # (the limit: see the docstring)
        r = sync(server, how, src / "d", dst / "d", "--streams", "--checksum")
        assert r.returncode == 0, r.stdout + r.stderr
        s = summary(r)
        assert s["problems"] == [] and s["files_same"] == 1 and s["files_new"] + s["files_updated"] == 1, s
        r = sync(server, how, src / "d", dst / "d", "--streams", "--checksum")
        assert summary(r)["files_same"] == 2 and summary(r)["bytes_written"] == 0, summary(r)
    with ntfs(tmp_path, "src") as src, ntfs(tmp_path, "dst") as dst:
        assert streams_of(dst / "d" / "f") == streams_of(src / "d" / "f")
        assert streams_of(dst / "d" / "f")["big"][100_000:100_001] == b"Y"


def test_a_stream_extended_without_end_while_it_is_sent_is_read_to_its_size_at_open(
        server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream sent whole was read until EOF, so its owner extending it faster than the
    sender read it (a truncate to a larger size, again and again) kept root's sync reading
    for ever. Now it is read to the size it had when opened (and the file, changed meanwhile,
    is sent again, then reported, as any file changed while read). The owner's step runs before
    each read of the stream by the sender (in this process); it stops after 64, for the old
    code to end at all."""
    real = os.preadv
    passes: list[tuple[int, list[int]]] = []  # each read of the stream: its size then, the offsets read

    def extend_then_read(fd: int, buffers: list[memoryview], offset: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("doc.txt:big"):
            if offset == 0:
                passes.append((os.fstat(fd).st_size, []))
            passes[-1][1].append(offset)
            if sum(len(o) for _, o in passes) <= 64:
                with open(f"/proc/self/fd/{fd}", "r+b") as f:
                    f.truncate(os.fstat(f.fileno()).st_size + 4 * 1024 * 1024)
        return real(fd, buffers, offset)

    with pushed_here(server, tmp_path, monkeypatch, os, "preadv", extend_then_read) as (res, _src, dst):
        assert passes and all(off < size for size, offsets in passes for off in offsets), passes
        # (each extension changes the file too: it is sent again, and reported after three tries)
        assert [(p.path, p.kind) for p in res.problems] == [("doc.txt", "changed")], res.problems
        assert not (dst / "data" / "doc.txt").exists() and (dst / "data" / "readonly.txt").read_text() == "ro\n"
