"""Round trips through the real CLI, checked with real tools (rsync -n --checksum, getfacl,
getfattr, diff) and with stat: content, owner, mode, ns times, ACLs, xattrs, symlinks,
hard links, sparse files, device nodes, odd names."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import blake3
import pytest

from tests.conftest import needs_root, needs_tools
from tests.integration.sync.conftest import dv, nothing_to_do, summary, write

pytestmark = [needs_root(), needs_tools("rsync", "getfacl", "setfacl", "getfattr", "setfattr"), pytest.mark.root]

ODD = [b"caf\xe9-latin1", b"new\nline", b"tab\there", b"-dash", b"sp ace", "ünï".encode()]


def make_tree(root: Path) -> None:
    rb = os.fsencode(root)
    write(root / "small.txt", b"hello\n", 0o644)
    write(root / "exec.sh", b"#!/bin/sh\necho hi\n", 0o755)
    write(root / "setuid", b"x" * 100, 0o4755)
    write(root / "big.bin", os.urandom(3 << 20), 0o600)
    write(root / "empty", b"")
    (root / "emptydir").mkdir()
    (root / "deep/a/b/c").mkdir(parents=True)
    write(root / "deep/a/b/c/leaf", b"leaf")
    os.chmod(root / "deep/a", 0o711)
    for n in ODD:
        with open(os.path.join(rb, n), "wb") as f:
            f.write(n * 3)
    odd_dir = os.path.join(rb, b"dir\xff\xfe")
    os.mkdir(odd_dir)
    with open(os.path.join(odd_dir, b"inner\n"), "wb") as f:
        f.write(b"inner")
    # owner and group that exist nowhere
    write(root / "owned", b"owned")
    os.chown(root / "owned", 1234, 5678)
    os.chown(root / "deep/a/b", 4321, 8765)
    # symlinks: relative, absolute, dangling, to a directory
    os.symlink("small.txt", root / "link-rel")
    os.symlink("/etc/hostname", root / "link-abs")
    os.symlink("does/not/exist", root / "link-dangling")
    os.symlink("deep", root / "link-dir")
    os.lchown(root / "link-rel", 1234, 5678)
    # hard links, one across directories
    write(root / "hl1", b"linked content")
    os.link(root / "hl1", root / "hl2")
    os.link(root / "hl1", root / "deep/hl3")
    # sparse: 64 MiB with 2 data regions
    with open(root / "sparse.img", "wb") as f:
        f.seek(8 << 20)
        f.write(os.urandom(70000))
        f.seek(40 << 20)
        f.write(b"tail")
        f.truncate(64 << 20)
    # special files
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "null-dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    # ACLs (access + default) and xattrs, binary values too
    subprocess.run(["setfacl", "-m", "u:1234:rwx,g:5678:r", str(root / "small.txt")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rx", str(root / "deep")], check=True)
    subprocess.run(["setfacl", "-m", "u:4321:rx", str(root / "deep")], check=True)
    os.setxattr(root / "big.bin", "user.note", b"binary\x00\xff value")
    os.setxattr(root / "deep", "user.dir", b"on a directory")
    os.setxattr(root / "fifo", "trusted.special", b"on a fifo")
    os.setxattr(root / "owned", "security.test", b"sec")
    # ns timestamps, old ones too
    for i, p in enumerate(sorted(root.rglob("*"))):
        if not p.is_symlink():
            os.utime(p, ns=(1_600_000_000_123_456_789 + i, 1_500_000_000_987_654_321 + i * 1_000_001))
    os.utime(root / "link-rel", ns=(1_400_000_000_000_000_001, 1_400_000_000_000_000_007),
             follow_symlinks=False)
    os.utime(root / "deep/a/b/c", ns=(1, 1_234_567_890_123_456_789))


def tool(*argv: str, cwd: Path) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True).stdout.decode("utf-8", "replace")


def stat_map(root: Path) -> dict[bytes, tuple]:
    out = {}
    rb = os.fsencode(root)
    for dirpath, dirs, files in os.walk(rb):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, rb)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                           st.st_mtime_ns, st.st_size, st.st_rdev, st.st_nlink)
    return out


def test_first_sync_keeps_everything(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    make_tree(src)
    os.utime(src, ns=(5, 1_111_111_111_222_222_222))
    log = tmp_path / "sync.log"
    p = dv("--json", "sync", "--acl", "--xattrs", "--log", str(log), str(src), str(dst))
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary(p)
    assert s["errors"] == 0 and s["hardlinks"] == 2 and s["symlinks"] == 4 and s["special"] == 2
    # real tools agree there is nothing left to do: content, perms, owners, times, ACLs, xattrs, links
    assert nothing_to_do(src, dst, "-A", "-X", "-D") == ""
    d = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(dst)], capture_output=True)
    # diff cannot compare device nodes and FIFOs and says so; anything else is a difference
    assert [ln for ln in d.stdout.splitlines() if not ln.endswith((b"special file", b"fifo"))] == []
    assert tool("getfacl", "-R", "-p", ".", cwd=src) == tool("getfacl", "-R", "-p", ".", cwd=dst)
    xa = ["getfattr", "-R", "-h", "-d", "-m", "-", "-e", "hex", "."]
    assert tool(*xa, cwd=src) == tool(*xa, cwd=dst)
    assert "trusted.special" in tool(*xa, cwd=dst) and "posix_acl_default" in tool(*xa, cwd=dst)
    # stat says the same, to the nanosecond; hard links share an inode; holes stay holes
    assert stat_map(src) == stat_map(dst)
    assert os.stat(dst).st_mtime_ns == 1_111_111_111_222_222_222
    assert os.stat(dst / "hl1").st_ino == os.stat(dst / "hl2").st_ino == os.stat(dst / "deep/hl3").st_ino
    assert os.stat(dst / "sparse.img").st_blocks * 512 < 1 << 20
    # no temp files are left behind
    assert not [p for p in dst.rglob("*") if p.name.startswith(".dv-sync-")]
    lines = log.read_text().splitlines()
    actions = {ln.split("\t")[1] for ln in lines}
    assert {"new", "symlink", "special", "hardlink", "mkdir"} <= actions
    assert any("new\\nline" in ln for ln in lines) and all(len(ln.split("\t")) == 7 for ln in lines)


def test_second_sync_has_nothing_to_do_then_mirrors_changes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    make_tree(src)
    assert dv("sync", "--acl", "--xattrs", str(src), str(dst)).returncode == 0
    s = summary(dv("--json", "sync", "--acl", "--xattrs", str(src), str(dst)))
    assert s["bytes_written"] == 0 and s["files_new"] == s["files_updated"] == s["meta_fixed"] == 0
    # change content, metadata only, ACL only, add and remove entries
    write(src / "small.txt", b"changed!\n")
    os.chmod(src / "exec.sh", 0o700)
    subprocess.run(["setfacl", "-x", "u:1234", str(src / "small.txt")], check=True)
    os.removexattr(src / "big.bin", "user.note")
    os.unlink(src / "empty")
    write(src / "deep/new.txt", b"new")
    write(dst / "extra-in-dst", b"only in dst")
    p = dv("--json", "sync", "--acl", "--xattrs", str(src), str(dst))
    s = summary(p)
    assert s["files_updated"] == 1 and s["files_new"] == 1 and s["meta_fixed"] >= 2 and s["deleted"] == 0
    assert (dst / "empty").exists() and (dst / "extra-in-dst").exists()  # no --delete: extras stay
    s = summary(dv("--json", "sync", "--acl", "--xattrs", "--delete", str(src), str(dst)))
    assert s["deleted"] == 2
    assert nothing_to_do(src, dst, "-A", "-X", "-D", "--delete") == ""


def test_excludes_includes_defaults_and_empty_dirs(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel in ["$RECYCLE.BIN/S-1-5/x", "System Volume Information/tracking.log", "a/keep.txt", "a/skip.tmp",
                "b/c/skip.tmp", "b/d/keep.txt", "cache/x.txt", "docs/$RECYCLE.BIN/kept-not-at-root"]:
        write(src / rel, rel.encode())
    (src / "empty").mkdir()
    write(dst / "cache/dst-only", b"protected: excluded")
    write(dst / "a/dst-only.tmp", b"protected: excluded, though only DST has it")
    write(dst / "stale.txt", b"removed by --delete")
    p = dv("--json", "sync", "--delete", "--exclude", "*.tmp", "--exclude", "/cache", str(src), str(dst))
    assert p.returncode == 0, p.stdout + p.stderr
    got = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert got == ["a/dst-only.tmp", "a/keep.txt", "b/d/keep.txt", "cache/dst-only",
                   "docs/$RECYCLE.BIN/kept-not-at-root"]
    assert (dst / "empty").is_dir() and (dst / "b/c").is_dir()  # empty dirs kept by default
    dst2 = tmp_path / "dst2"
    p = dv("sync", "--skip-empty-dirs", "--include", "*.txt", "--exclude", "/cache", str(src), str(dst2))
    assert p.returncode == 0, p.stderr
    assert sorted(str(p.relative_to(dst2)) for p in dst2.rglob("*")) == ["a", "a/keep.txt", "b", "b/d", "b/d/keep.txt"]
    dst3 = tmp_path / "dst3"
    assert dv("sync", "--no-default-excludes", str(src), str(dst3)).returncode == 0
    assert (dst3 / "$RECYCLE.BIN/S-1-5/x").exists()


def test_checksum_finds_same_size_same_mtime_changes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    f = write(src / "f", b"A" * 5000)
    assert dv("sync", str(src), str(dst)).returncode == 0
    st = os.stat(f)
    f.write_bytes(b"B" * 5000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert summary(dv("--json", "sync", str(src), str(dst)))["files_same"] == 1
    assert (dst / "f").read_bytes() == b"A" * 5000  # quick check cannot see it
    s = summary(dv("--json", "sync", "--checksum", str(src), str(dst)))
    assert s["files_updated"] == 1 and (dst / "f").read_bytes() == b"B" * 5000
    assert summary(dv("--json", "sync", "--checksum", str(src), str(dst)))["files_same"] == 1


def test_verify_logs_digests_read_from_disk(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = {f"f{i}": os.urandom(i * 70001) for i in range(5)}
    for n, d in data.items():
        write(src / n, d)
    log = tmp_path / "log"
    s = summary(dv("--json", "sync", "--verify", "--log", str(log), str(src), str(dst)))
    assert s["files_verified"] == 5 and s["bytes_verified"] == sum(map(len, data.values()))
    rows = {ln.split("\t")[5]: ln.split("\t") for ln in log.read_text().splitlines()}
    for n, d in data.items():
        assert rows[n][1] == "new" and rows[n][4] == blake3.blake3(d).hexdigest()


def test_file_replaced_by_directory_and_back(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "x", b"file")
    assert dv("sync", str(src), str(dst)).returncode == 0
    os.unlink(src / "x")
    write(src / "x/inner", b"now a dir")
    assert dv("sync", str(src), str(dst)).returncode == 0
    assert (dst / "x/inner").read_bytes() == b"now a dir"
    import shutil

    shutil.rmtree(src / "x")
    write(src / "x", b"file again")
    p = dv("--json", "sync", str(src), str(dst))
    assert p.returncode == 3 and "in the way" in p.stdout  # only --delete removes a directory
    assert dv("sync", "--delete", str(src), str(dst)).returncode == 0
    assert (dst / "x").read_bytes() == b"file again"


def test_refuses_overlapping_paths(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    p = dv("sync", str(tmp_path / "src"), str(tmp_path / "src/inside"))
    assert p.returncode == 2 and "overlap" in p.stderr
