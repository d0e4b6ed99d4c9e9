"""Each restored entry ends with exactly the snapshot's owner, mode, ACLs and file
capabilities, whatever the umask, a setgid target or a default ACL on the target (what a
restore that created files with their own modes, or skipped a chown or an ACL lookup where
they seemed needless, would have to keep)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deltavault.testing.hostile import NOBODY
from tests.conftest import Cli, needs_root, needs_tools
from tests.hostileutil import acl_names, as_nobody
from tests.loopdev import loop, mounted, run, umount

pytestmark = [needs_root(), pytest.mark.root, needs_tools("setfacl", "setpriv")]


def _tree(src: Path) -> None:
    """Files and directories of several modes and owners, one with an ACL of its own."""
    a = src / "a"
    (a / "b").mkdir(parents=True)
    for name, mode in (("f644", 0o644), ("f600", 0o600), ("f755", 0o755), ("suid", 0o4755), ("ro", 0o444)):
        (a / name).write_bytes(name.encode() * 100)
        os.chmod(a / name, mode)
    theirs = a / "theirs"
    theirs.write_bytes(b"nobody's\n")
    os.chown(theirs, NOBODY, NOBODY)
    theirs.chmod(0o640)
    acl = a / "acl"
    acl.write_bytes(b"with an ACL\n")
    acl.chmod(0o640)
    subprocess.run(["setfacl", "-m", "u:nobody:r", str(acl)], check=True)
    (a / "b" / "g").write_bytes(b"g\n")
    os.chown(a / "b", NOBODY, 0)
    (a / "b").chmod(0o2750)
    a.chmod(0o750)
    src.chmod(0o755)


def _meta(root: Path) -> dict[str, tuple[int, int, int, list[str]]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), acl_names(p))
    return out


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _backup(cli: Cli, src: Path) -> dict[str, tuple[int, int, int, list[str]]]:
    _tree(src)
    assert cli("init").returncode == 0
    r = cli("backup", str(src))
    assert r.returncode == 0, r.stderr
    return _meta(src)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o277])
def test_modes_owners_and_acls_are_the_snapshots_in_a_setgid_target_whatever_the_umask(
        cli: Cli, tmp_path: Path, mask: int) -> None:
    want = _backup(cli, tmp_path / "src")
    target = tmp_path / "target"
    target.mkdir()
    os.chown(target, 0, 4242)  # what is made in it gets this group
    target.chmod(0o2755)
    with _umask(mask):
        r = cli("restore", "latest", "--target", str(target))
    assert r.returncode == 0, r.stdout + r.stderr
    got = _meta(target / "src")
    assert got == want
    assert got["a/acl"][3] == ["system.posix_acl_access"]


def test_a_default_acl_on_the_target_reaches_nothing_restored(cli: Cli, tmp_path: Path,
                                                               shared_dir: Path) -> None:
    """The target's own default ACL is inherited by the directories made in it, and by what
    is made in those: no entry may keep it, and nobody may read what the snapshot denies."""
    want = _backup(cli, tmp_path / "src")
    target = shared_dir / "target"
    target.mkdir()
    subprocess.run(["setfacl", "-d", "-m", "u:nobody:rwx", str(target)], check=True)
    r = cli("restore", "latest", "--target", str(target))
    assert r.returncode == 0, r.stdout + r.stderr
    restored = target / "src"
    assert _meta(restored) == want
    p = as_nobody("cat", str(restored / "a" / "f600"))
    assert p.returncode != 0 and "f600" not in p.stdout


@needs_tools("setcap")
def test_file_capabilities_survive_the_owner_being_set(cli: Cli, tmp_path: Path) -> None:
    """chown removes a file's capabilities (security.capability), even as root and to the
    same owner: they were set with the other xattrs, before the owner, and every restored
    file lost them (ping, restored from a system's backup, could no longer open raw sockets)."""
    src = tmp_path / "src"
    src.mkdir()
    for name, owner in (("theirs", NOBODY), ("mine", 0)):
        (src / name).write_bytes(b"#!/bin/sh\n")
        os.chown(src / name, owner, owner)
        (src / name).chmod(0o755)
        subprocess.run(["setcap", "cap_net_raw+ep", str(src / name)], check=True)
    want = os.getxattr(src / "mine", "security.capability")
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    (tmp_path / "existing" / "src").mkdir(parents=True)  # a directory of ours the restore writes in
    for target in (tmp_path / "new", tmp_path / "existing"):
        r = cli("restore", "latest", "--target", str(target))
        assert r.returncode == 0, r.stdout + r.stderr
        for name, owner in (("theirs", NOBODY), ("mine", 0)):
            p = target / "src" / name
            assert os.getxattr(p, "security.capability") == want, p
            assert p.stat().st_uid == owner and stat.S_IMODE(p.stat().st_mode) == 0o755


@needs_tools("strace")
def test_files_made_in_directories_made_are_not_given_what_they_have(cli: Cli, tmp_path: Path) -> None:
    """A file made in a directory the restore made already has the owner the file system
    gives it, the mode it was created with and no ACL the directory did not pass on: no
    fchown, fchmod or flistxattr for it
    (they were a twentieth of an S3 restore's walk, issue #17), and it still ends as the
    snapshot has it (the tests above: setgid target, default ACL)."""
    src = tmp_path / "src"
    for d in ("d1", "d2"):
        (src / d).mkdir(parents=True)
        for i in range(100):
            (src / d / f"f{i}").write_bytes(b"x" * i)
    (src / "d2" / "theirs").write_bytes(b"nobody's\n")
    os.chown(src / "d2" / "theirs", NOBODY, NOBODY)
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    want = _meta(src)
    trace = tmp_path / "trace"
    target = tmp_path / "target"
    with _umask(0o022):
        p = subprocess.run(["strace", "-f", "-qq", "-e", "trace=flistxattr,fchown,fchmod", "-o", str(trace),
                            sys.executable, "-m", "deltavault", "restore", "latest", "--target", str(target)],
                           env=cli.env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert _meta(target / "src") == want
    calls = trace.read_text().splitlines()
    # the three directories' own (their metadata is set last, whatever they hold) and the
    # one file whose owner differs
    assert len([c for c in calls if "flistxattr(" in c]) <= 3, calls
    assert len([c for c in calls if "fchown(" in c]) <= 4, calls
    assert len([c for c in calls if "fchmod(" in c]) <= 3, calls  # created with their modes


@pytest.mark.parametrize("fs,option", [("ext4", "grpid"), ("ext4", "bsdgroups"), ("xfs", "grpid")])
def test_owners_are_the_snapshots_on_a_file_system_mounted_grpid(cli: Cli, tmp_path: Path, fs: str,
                                                                 option: str) -> None:
    """Mounted grpid (bsdgroups), a new entry takes its directory's group without the setgid
    bit: the directories the restore makes get the target's group (4242), and so do the
    files made in them, which must still end with the snapshot's group."""
    want = _backup(cli, tmp_path / "src")
    mkfs = ["mkfs.ext4", "-q", "-F"] if fs == "ext4" else ["mkfs.xfs", "-q", "-f"]
    img = tmp_path / "fs.img"
    run("truncate", "-s", "320M", str(img))
    run(*mkfs, str(img))
    with loop(img) as dev, mounted(dev, tmp_path / "mnt", "-o", option) as mnt:
        target = mnt / "target"
        target.mkdir()
        os.chown(target, 0, 4242)
        probe = target / "probe"
        probe.mkdir()
        assert probe.stat().st_gid == 4242 and not probe.stat().st_mode & stat.S_ISGID  # the option holds
        probe.rmdir()
        r = cli("restore", "latest", "--target", str(target))
        assert r.returncode == 0, r.stdout + r.stderr
        assert _meta(target / "src") == want


@contextmanager
def _maskfs(tmp_path: Path, mask: int) -> Iterator[Path]:
    """tests/fusefs/maskfs.py mounted at tmp_path/mnt: new files get their mode less ``mask``."""
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    server = subprocess.Popen([sys.executable, "-m", "tests.fusefs.maskfs", str(backing), str(mnt), f"{mask:o}"],
                              env=env, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if os.path.ismount(mnt):
                break
            assert server.poll() is None, server.communicate()[1]
            time.sleep(0.05)
        assert os.path.ismount(mnt), "maskfs did not mount"
        yield mnt
    finally:
        umount(mnt)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_modes_are_the_snapshots_where_the_file_system_masks_new_files(cli: Cli, tmp_path: Path) -> None:
    """A file system may give a new file less than mode & ~umask (an sshfs server's own
    umask, an NFS or ZFS server's inherited ACL) and still take chmod: a file created with
    its final mode, its chmod skipped, kept what the file system gave it (0600, not 0644)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for name, mode in (("f644", 0o644), ("f755", 0o755), ("f600", 0o600)):
        (src / "d" / name).write_bytes(name.encode())
        (src / "d" / name).chmod(mode)
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    with _maskfs(tmp_path, 0o077) as mnt, _umask(0o022):
        r = cli("restore", "latest", "--target", str(mnt / "target"))
        assert r.returncode == 0, r.stdout + r.stderr
        got = {n: stat.S_IMODE((mnt / "target" / "src" / "d" / n).stat().st_mode) for n in ("f644", "f755", "f600")}
    assert got == {"f644": 0o644, "f755": 0o755, "f600": 0o600}
