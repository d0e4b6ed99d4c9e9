"""deltavault mount with real FUSE: every metadata point through the mount against the
source tree, random reads through content references (full blobs, holes, page patches),
SEEK_DATA/SEEK_HOLE, new snapshots appearing and pruned ones vanishing while backup and
prune run, clean exits on SIGINT and SIGTERM."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deltavault.backends.local import LocalBackend
from deltavault.model.content import Full, Hole, Patch
from deltavault.objects.walk import find
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli, needs_root, needs_tools
from tests.integration.mount.conftest import (
    _mounted,
    leave_by_signal,
    mount_daemon,
    mounted,
)
from tests.treeutil import manifest

pytestmark = [needs_root(), needs_tools("fusermount3", "setfacl"), pytest.mark.root]
MiB = 1 << 20


def rich_tree(src: Path) -> None:
    """Every kind of entry and metadata a snapshot keeps."""
    rnd = random.Random(7)
    (src / "dir" / "deeper").mkdir(parents=True)
    (src / "plain.txt").write_bytes(b"hello\n")
    (src / "big.bin").write_bytes(rnd.randbytes(3 * MiB + 123))
    for i in range(20):
        (src / "dir" / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(0, 200_000)))
    with open(src / "sparse.img", "wb") as f:  # holes page- and MiB-aligned, data between
        f.truncate(16 * MiB)
        f.seek(2 * MiB)
        f.write(rnd.randbytes(MiB))
        f.seek(9 * MiB)
        f.write(rnd.randbytes(300_000))
    os.link(src / "big.bin", src / "dir" / "big-link.bin")
    os.symlink("../plain.txt", src / "dir" / "rel-link")
    os.symlink("/nonexistent/target", src / "dangling")
    os.mkfifo(src / "fifo")
    os.mknod(src / "dir" / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (src / os.fsdecode(b"caf\xe9 \x1b[31m\nname")).write_bytes(b"odd name\n")
    os.setxattr(src / "plain.txt", "user.note", b"some \x00 bytes")
    subprocess.run(["setfacl", "-m", "u:nobody:r,g:adm:rw", str(src / "plain.txt")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:nobody:rx", str(src / "dir")], check=True)
    os.chown(src / "dir" / "f1", 1234, 5678)
    os.chmod(src / "dir" / "f2", 0o4750)
    os.chmod(src / "dir" / "deeper", 0o711)
    for i, p in enumerate(sorted(src.rglob("*"))):
        if not p.is_symlink():
            os.utime(p, ns=(1_700_000_000_123_456_789 + i, 1_600_000_000_987_654_321 + i * 1_000_001))


def _snapshot_dir(mnt: Path) -> Path:
    names = [n for n in os.listdir(mnt / "snapshots") if n != "latest"]
    assert len(names) == 1, names
    return mnt / "snapshots" / names[0]


def test_every_metadata_point_through_the_mount_equals_the_source(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rich_tree(src)
    assert cli("init").returncode == 0
    r = cli("backup", str(src))
    assert r.returncode == 0, r.stderr
    atimes = {p: os.lstat(p).st_atime_ns for p in src.rglob("*") if p.is_file() and not p.is_symlink()}
    with mounted(cli, tmp_path / "mnt") as mnt:
        snap = _snapshot_dir(mnt)
        root = snap / "src"
        # content (holes included, by SEEK_DATA/SEEK_HOLE), type, mode, owner, mtime ns, xattrs
        # with the ACLs, symlink targets, device numbers, hard-link groups
        assert manifest(root) == manifest(src)
        for p, when in atimes.items():
            assert os.lstat(root / p.relative_to(src)).st_atime_ns == when
        a, b = os.lstat(root / "big.bin"), os.lstat(root / "dir" / "big-link.bin")
        assert a.st_nlink == b.st_nlink == 2 and a.st_ino == b.st_ino
        assert os.getxattr(root / "plain.txt", "system.posix_acl_access") == \
            os.getxattr(src / "plain.txt", "system.posix_acl_access")
        assert os.getxattr(root / "dir", "system.posix_acl_default") == \
            os.getxattr(src / "dir", "system.posix_acl_default")
        getfacl = subprocess.run(["getfacl", "-p", str(root / "plain.txt")], capture_output=True, text=True)
        assert "user:nobody:r--" in getfacl.stdout
        fd = os.open(root / "sparse.img", os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 2 * MiB
            assert os.lseek(fd, 2 * MiB, os.SEEK_HOLE) == 3 * MiB
            assert os.lseek(fd, 3 * MiB, os.SEEK_DATA) == 9 * MiB
            with pytest.raises(OSError) as exc:
                os.lseek(fd, 10 * MiB, os.SEEK_DATA)
            assert exc.value.errno == errno.ENXIO
        finally:
            os.close(fd)
        assert os.lstat(root / "sparse.img").st_blocks * 512 < 2 * MiB
        # the other views of the same snapshot
        host = os.uname().nodename
        link = mnt / "by-host" / host / Path(str(src).lstrip("/")) / "latest"
        assert os.path.samefile(link / "plain.txt", root / "plain.txt")
        assert os.readlink(mnt / "snapshots" / "latest") == snap.name
        # read-only
        with pytest.raises(OSError) as exc:
            os.open(root / "plain.txt", os.O_RDWR)
        assert exc.value.errno in (errno.EROFS, errno.EACCES)


def test_1000_random_reads_through_full_blobs_holes_and_patches(cli: Cli, tmp_path: Path) -> None:
    rnd = random.Random(11)
    src = tmp_path / "src"
    src.mkdir()
    size = 48 * MiB
    data = bytearray(rnd.randbytes(size))
    data[20 * MiB:28 * MiB] = bytes(8 * MiB)
    with open(src / "db.bin", "wb") as f:
        f.write(data[:20 * MiB])
        f.seek(28 * MiB)  # an 8 MiB hole
        f.write(data[28 * MiB:])
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    old = bytes(data)
    time.sleep(1.1)
    with open(src / "db.bin", "r+b") as f:  # changed in place: stored as page patches
        for _ in range(40):
            off = rnd.randrange(0, 20 * MiB // 4096) * 4096
            page = rnd.randbytes(4096)
            data[off:off + 4096] = page
            f.seek(off)
            f.write(page)
    r = cli("backup", str(src))
    assert r.returncode == 0, r.stderr
    repo = Repository.open(LocalBackend(cli.repo), lambda: PASSWORD, use_cache=False)
    snaps = repo.list_snapshots()
    node = find(repo, snaps[-1][1].tree, "src/db.bin")  # type: ignore[arg-type]
    kinds = {type(ref) for ref in node.content} if node else set()
    assert {Full, Hole, Patch} <= kinds, kinds
    with mounted(cli, tmp_path / "mnt") as mnt:
        names = sorted(n for n in os.listdir(mnt / "snapshots") if n != "latest")
        for name, want in ((names[0], old), (names[1], bytes(data))):
            fd = os.open(mnt / "snapshots" / name / "src" / "db.bin", os.O_RDONLY)
            try:
                for _ in range(1000):
                    off = rnd.randrange(0, size)
                    n = rnd.choice((1, 4096, 65536, 300_000, 2 * MiB))
                    assert os.pread(fd, n, off) == want[off:off + n], (name, off, n)
                assert os.lseek(fd, 0, os.SEEK_HOLE) == 20 * MiB
                assert os.lseek(fd, 20 * MiB, os.SEEK_DATA) == 28 * MiB
            finally:
                os.close(fd)


PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_pages(fd: int, size: int) -> set[int]:
    """The pages of an open file the kernel holds in its page cache (mincore of a mapping,
    which asks the FUSE daemon nothing)."""
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = (ctypes.c_ubyte * (-(-size // PAGE)))()
        assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        return {i for i, v in enumerate(vec) if v & 1}
    finally:
        _libc.munmap(addr, size)


def test_a_files_pages_stay_cached_across_opens(cli: Cli, tmp_path: Path) -> None:
    """A snapshot's file never changes, so each open lets the kernel keep its pages
    (keep_cache): a second open and read of the whole file asks the daemon for no page the
    cache held. Warm reads through the mount run at page-cache speed only so."""
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(5).randbytes(8 * MiB + 123)
    (src / "f.bin").write_bytes(data)
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    log = tmp_path / "fuse.log"
    read_line = re.compile(rb"^read\[\d+\] (\d+) bytes from (\d+) flags", re.M)
    with mounted(cli, tmp_path / "mnt", "--debug-fuse", log=log) as mnt:
        path = _snapshot_dir(mnt) / "src" / "f.bin"
        first = os.open(path, os.O_RDONLY)
        try:
            assert os.read(first, len(data) + 1) == data
            asked: list[tuple[int, int]] = []
            # The machine's reclaim may take a page between the check and the read; a
            # page taken so is asked for again, rightly: try three times. Without
            # keep_cache every open drops every page, and each try fails.
            for _ in range(3):
                held = resident_pages(first, len(data))  # through the first open: no new open
                assert len(held) > len(data) // PAGE // 2, "the first read left few pages cached"
                start = log.stat().st_size
                second = os.open(path, os.O_RDONLY)
                try:
                    assert os.read(second, len(data) + 1) == data
                finally:
                    os.close(second)
                with open(log, "rb") as f:
                    f.seek(start)
                    reads = [(int(m[2]), int(m[1])) for m in read_line.finditer(f.read())]
                asked = [(off, n) for off, n in reads
                         if any(p in held for p in range(off // PAGE, -(-(off + n) // PAGE)))]
                if not asked:
                    break
            assert asked == [], f"the daemon was asked again for cached pages: {asked[:5]}"
        finally:
            os.close(first)


def test_backup_and_prune_while_mounted_new_appear_pruned_vanish_nothing_wrong(cli: Cli, tmp_path: Path) -> None:
    """A reader walks every listed snapshot the whole time and checks each file against the
    version that snapshot holds: it may find one gone (pruned under it), never wrong or
    half-written; prune is not blocked by the mount."""
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(3)
    versions: dict[bytes, dict[str, bytes]] = {}

    def write(v: int) -> None:
        files = {"version": b"%d" % v, "a.bin": rnd.randbytes(2 * MiB), "b.bin": rnd.randbytes(300_000)}
        for k, d in files.items():
            (src / k).write_bytes(d)
        versions[files["version"]] = files

    write(1)
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    seen: set[str] = set()
    gone: set[str] = set()
    wrong: list[str] = []
    stop = threading.Event()

    def reader(mnt: Path) -> None:
        while not stop.is_set():
            try:
                names = [n for n in os.listdir(mnt / "snapshots") if n != "latest"]
            except OSError as exc:
                wrong.append(f"listing: {exc}")
                return
            for name in names:
                root = mnt / "snapshots" / name / "src"
                try:
                    want = versions[(root / "version").read_bytes()]
                    for k, d in want.items():
                        if (root / k).read_bytes() != d:
                            wrong.append(f"{name}/{k} differs")
                    seen.add(name)
                except FileNotFoundError:
                    gone.add(name)
                except OSError as exc:
                    if exc.errno != errno.EIO:  # EIO: its blobs were pruned while we read
                        wrong.append(f"{name}: {exc}")
                    gone.add(name)

    with mounted(cli, tmp_path / "mnt", "--refresh", "0.2") as mnt:
        names0 = [n for n in os.listdir(mnt / "snapshots") if n != "latest"]
        t = threading.Thread(target=reader, args=(mnt,))
        t.start()
        try:
            for v in (2, 3):
                time.sleep(1.1)
                write(v)
                r = cli("backup", str(src))
                assert r.returncode == 0, r.stderr
            deadline = time.monotonic() + 10
            while len([n for n in os.listdir(mnt / "snapshots") if n != "latest"]) < 3:
                assert time.monotonic() < deadline, "new snapshots did not appear"
                time.sleep(0.1)
            old_id = names0[0].rsplit("_", 1)[1]
            assert cli("forget", old_id).returncode == 0
            r = cli("prune", "--repack-threshold", "0.01")
            assert r.returncode == 0, r.stdout + r.stderr  # the mount holds no lock
            deadline = time.monotonic() + 10
            while names0[0] in os.listdir(mnt / "snapshots"):
                assert time.monotonic() < deadline, "the pruned snapshot is still listed"
                time.sleep(0.1)
            time.sleep(1)
        finally:
            stop.set()
            t.join()
        assert wrong == []
        assert len(seen) >= 3
        assert gone <= {names0[0]}, gone
        # what is left reads back exactly
        for name in os.listdir(mnt / "snapshots"):
            if name != "latest":
                root = mnt / "snapshots" / name / "src"
                want = versions[(root / "version").read_bytes()]
                assert all((root / k).read_bytes() == d for k, d in want.items())
    assert cli("check", "--read-data").returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_unmounts_cleanly(cli: Cli, tmp_path: Path, sig: int) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    mnt = tmp_path / "mnt"
    with mount_daemon(cli, mnt) as d:
        assert (_snapshot_dir(mnt) / "src" / "f").read_bytes() == b"x"
        leave_by_signal(d, mnt, sig)


def test_the_foreground_mount_says_how_to_leave(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "deltavault", "mount", str(mnt)], env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline() + proc.stdout.readline()
        assert "Ctrl-C" in first and f"fusermount3 -u {mnt}" in first
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if _mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)])


def test_a_repository_named_by_a_relative_path_reads_through_the_mount(cli: Cli, tmp_path: Path) -> None:
    """libfuse changes the process's directory to / as it mounts, for every thread: the
    index, read on first use, was then looked for under /, and every file read failed."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"hello\n")
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    relative = Cli(cli.repo, cli.cache, cli.password_file,
                   {**cli.env, "DELTAVAULT_REPOSITORY": os.path.relpath(cli.repo, tmp_path)})
    with mounted(relative, tmp_path / "mnt", cwd=tmp_path) as mnt:
        [got] = _snapshot_dir(mnt).rglob("a.txt")
        assert got.read_bytes() == b"hello\n"
