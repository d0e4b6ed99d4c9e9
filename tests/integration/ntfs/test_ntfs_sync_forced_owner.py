"""sync into an ntfs-3g mount with ``uid=``/``gid=``: every entry shows that owner, the
entries sync makes too. Each special file and directory made under a temp name was refused
as "not the entry just created" (its owner is not ours) and its temp name left in DST for
good. Our own creations are now told by the owner the file system gives an entry we make
there (a probe file, read through its own fd); a swap the owner cannot tell apart there is
still refused by what remains: its type, one link, its identity at the rename."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

import deltavault.sync.receiver.specials as specials_mod
import deltavault.sync.receiver.temps as temps_mod
from deltavault.sync.local.engine import Syncer
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.temps import TEMP_PREFIX
from tests.conftest import needs_root, needs_tools
from tests.integration.ntfs.ntfsutil import ntfs
from tests.integration.sync.conftest import REMOTE, dv, write
from tests.sshd import missing_tools

pytestmark = [needs_root(), needs_tools("mkntfs", "ntfs-3g")]

FORCED = "uid=1234,gid=1234"


def _tree(src: Path) -> None:
    """A FIFO, a symlink, a hard link and a directory (with a file) in SRC."""
    write(src / "a", b"linked\n", 0o644)
    os.link(src / "a", src / "b")
    os.mkfifo(src / "fifo", 0o640)
    os.symlink("a", src / "sym")
    write(src / "sub" / "f", b"below\n", 0o600)


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TEMP_PREFIX.decode())]


@pytest.mark.parametrize("how", ["local", pytest.param("push", marks=pytest.mark.skipif(
    missing_tools() is not None, reason=missing_tools() or ""))])
def test_sync_into_a_mount_that_forces_owners(tmp_path: Path, how: str, request: pytest.FixtureRequest) -> None:
    src = tmp_path / "src"
    _tree(src)
    with ntfs(tmp_path, "dst", streams=None, options=FORCED) as mnt:
        dst = mnt / "mirror"
        if how == "push":  # the agent's receiver, through the sshd
            server = request.getfixturevalue("server")
            args = ["--remote-command", REMOTE, str(src), f"dvtest:{dst}"]
            env = {"DELTAVAULT_SSH_CONFIG": str(server.ssh_config)}
        else:
            args, env = [str(src), str(dst)], {}
        for run in (1, 2):  # the second finds what the first made, owned by 1234
            r = dv("sync", *args, env=env)
            assert r.returncode == 0, (run, r.stdout + r.stderr)
            assert "replaced during the run" not in r.stdout + r.stderr
            assert _temps(mnt) == []
            assert stat.S_ISFIFO((dst / "fifo").lstat().st_mode)
            assert os.readlink(dst / "sym") == "a"
            assert (dst / "a").stat().st_ino == (dst / "b").stat().st_ino
            assert (dst / "b").read_bytes() == b"linked\n"
            assert (dst / "sub" / "f").read_bytes() == b"below\n"
            assert {p.lstat().st_uid for p in mnt.rglob("*")} == {1234}  # what the file system shows


def test_a_swapped_in_link_is_still_refused_where_owners_are_forced(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after the FIFO is made, its temp name is swapped for a hard link to a file
    elsewhere on the file system (its owner shows 1234 as ours do): refused, and neither
    that file nor the link is touched or removed."""
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "fifo", 0o640)
    with ntfs(tmp_path, "dst", streams=None, options=FORCED) as mnt:
        outside = write(mnt / "outside", b"not DST's\n")
        before = outside.stat()
        dst = mnt / "mirror"
        real = specials_mod.created_handle
        swapped: list[bytes] = []

        def created_handle(dir_fd: int, tmp: bytes, fmt: int, *rest: Any) -> Any:
            os.rename(tmp, b"stolen", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.link(outside, os.fsencode(dst) + b"/" + tmp)
            swapped.append(tmp)
            return real(dir_fd, tmp, fmt, *rest)

        monkeypatch.setattr(specials_mod, "created_handle", created_handle)
        problems = Syncer(src, dst, SyncOptions(processes=1)).run().problems
        assert [(p.path, p.kind) for p in problems] == [("fifo", "write")]
        assert "not the entry just created" in problems[0].message
        (tmp,) = swapped
        left = os.stat(os.fsencode(dst) + b"/" + tmp)
        assert (left.st_ino, left.st_nlink) == (before.st_ino, 2)  # the link, left alone
        after = outside.stat()
        assert (after.st_mode, after.st_mtime_ns, outside.read_bytes()) == (before.st_mode, before.st_mtime_ns,
                                                                            b"not DST's\n")
        assert not (dst / "fifo").exists()


@pytest.mark.parametrize("forced", [True, False])
def test_the_owner_is_probed_once_per_file_system_not_per_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                forced: bool) -> None:
    """The owner a file system gives our entries is the mount's: one probe file for a run,
    not a create, stat and unlink more for each directory, symlink and FIFO made; none
    where the file system records creators (our entries are ours)."""
    src = tmp_path / "src"
    for i in range(10):
        (src / f"d{i}").mkdir(parents=True)
        os.mkfifo(src / f"d{i}" / "fifo", 0o640)
        os.symlink("fifo", src / f"d{i}" / "sym")
    real = temps_mod.new_entry_owner
    probes: list[bytes] = []

    def new_entry_owner(dir_fd: int, name: bytes) -> int:
        probes.append(name)
        return real(dir_fd, name)

    monkeypatch.setattr(temps_mod, "new_entry_owner", new_entry_owner)
    with ntfs(tmp_path, "dst", streams=None, options=FORCED if forced else "") as mnt:
        dst = mnt / "mirror"
        problems = Syncer(src, dst, SyncOptions(processes=1)).run().problems
        assert problems == []
        assert _temps(mnt) == []
        assert all(stat.S_ISFIFO((dst / f"d{i}" / "fifo").lstat().st_mode) for i in range(10))
    assert len(probes) == (1 if forced else 0), probes
