"""A file another user planted in DST with SRC's size and modification time (anyone who
can write in DST can forge both with utime on a file of their own).

The quick check kept it as SRC's, and since its owner and mode differed from SRC's,
corrected them in place: as root, the attacker's bytes became a setuid-root program in the
mirror. With SRC's content planted, the file was chowned to root while the attacker, who
made it, could still hold it open for writing. A file is now kept only if it has the owner
the sync would give it (a user cannot give a file away); any other is written anew."""

from __future__ import annotations

import hashlib
import os
import shlex
import stat
from pathlib import Path
from typing import Any

import pytest

from deltavault.fs import dirfd
from deltavault.sync.local.engine import Syncer
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.core import Receiver
from deltavault.sync.receiver.temps import TEMP_PREFIX, Where
from deltavault.sync.report import SyncLog
from deltavault.testing.hostile import NOBODY
from tests.conftest import needs_root, needs_tools
from tests.hostileutil import acl_names, as_nobody, fork_as_nobody, plant_acl_dir, secret_tree
from tests.integration.sync.conftest import REMOTE, summary
from tests.integration.sync.test_sync_hostile import no_sshd, sync

pytestmark = [needs_root(), pytest.mark.root, needs_tools("setfacl", "setpriv")]

MiB = 1 << 20
REAL = b"#!/bin/sh\necho the program backed up\n"
EVIL = b"#!/bin/sh\nexec /bin/sh -p  # evil!!!\n"


def _plant_as_nobody(path: Path, data: bytes, mtime_ns: int) -> int:
    """``path`` made by user nobody, with ``data`` and that modification time; its inode."""
    def plant() -> None:
        path.write_bytes(data)
        os.utime(path, ns=(mtime_ns, mtime_ns))

    _, status = os.waitpid(fork_as_nobody(plant), 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return path.stat().st_ino


@pytest.mark.parametrize("planted", [EVIL, REAL], ids=["other-bytes", "same-bytes"])
@pytest.mark.parametrize("extra", [(), ("--checksum",)], ids=["quick", "checksum"])
@pytest.mark.parametrize("where", ["local", pytest.param("push", marks=no_sshd)])
def test_a_file_another_user_planted_with_the_size_and_time_is_replaced(shared_dir: Path, planted: bytes,
                                                                        extra: tuple[str, ...], where: str,
                                                                        request: pytest.FixtureRequest) -> None:
    srv = request.getfixturevalue("server") if where == "push" else None
    assert len(EVIL) == len(REAL)
    src, dst = shared_dir / "src", shared_dir / "dst"
    src.mkdir()
    (src / "prog").write_bytes(REAL)
    (src / "prog").chmod(0o4755)
    dst.mkdir(mode=0o755)
    os.chown(dst, NOBODY, NOBODY)  # DST, or a directory in it, others can write in
    ino = _plant_as_nobody(dst / "prog", planted, (src / "prog").stat().st_mtime_ns)
    p = sync(src, dst, *extra, server=srv)
    assert p.returncode == 0, p.stdout + p.stderr
    st = (dst / "prog").stat()
    assert (dst / "prog").read_bytes() == REAL
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o4755
    assert st.st_ino != ino  # a file of the sync's own, not the attacker's made root's
    # The sync's own file, unchanged, is kept from now on.
    p = sync(src, dst, *extra, server=srv)
    assert p.returncode == 0 and (dst / "prog").stat().st_ino == st.st_ino, p.stdout + p.stderr


@pytest.mark.parametrize("where", ["local", pytest.param("push", marks=no_sshd)])
def test_a_planted_directory_with_a_default_acl_gives_its_maker_nothing(shared_dir: Path, where: str,
                                                                         request: pytest.FixtureRequest) -> None:
    """A directory of another user met in DST was used as it was: the files sync made in it
    inherited its default ACL, and SRC's 0640 mode let its maker read them for good (as in
    restore: test_restore_planted_dirs.py). It is now made sync's own, 0700, without ACLs
    before anything is written in it; its metadata is SRC's at the end."""
    src, dst = shared_dir / "src", shared_dir / "dst"
    secret_tree(src)
    dst.mkdir()
    dst.chmod(0o777)
    planted = dst / "private"
    plant_acl_dir(planted)
    p = sync(src, dst, server=request.getfixturevalue("server") if where == "push" else None)
    assert p.returncode == 0, p.stdout + p.stderr
    secret = planted / "secret"
    assert secret.read_bytes() == b"top secret\n"
    p = as_nobody("cat", str(secret))
    assert p.returncode != 0 and "top secret" not in p.stdout
    for path, mode in ((planted, 0o750), (secret, 0o640)):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, mode), path
        assert acl_names(path) == [], path


@pytest.mark.parametrize("where", ["local", pytest.param("push", marks=no_sshd)])
def test_a_directory_that_will_be_its_owners_is_still_taken_while_written_in(
        shared_dir: Path, where: str, request: pytest.FixtureRequest) -> None:
    """SRC's "home" is nobody's and holds root's 0750 "private" with a 0640 file; DST's
    "home" is nobody's too (an earlier sync gave it SRC's owner), and nobody gave it a
    default ACL. As the owner the sync gives it, it was used as it was: "private" and its
    file inherited the ACL, and nobody read root's file for good. A directory of another
    user is now taken for the run whoever it will belong to; SRC's owner at the end."""
    src, dst = shared_dir / "src", shared_dir / "dst"
    secret_tree(src / "home")
    os.chown(src / "home", NOBODY, NOBODY)
    dst.mkdir()
    dst.chmod(0o777)
    plant_acl_dir(dst / "home")
    dst.chmod(0o755)
    os.chmod(dst / "home", 0o755)  # (not more open than SRC's: only its owner is the matter)
    p = sync(src, dst, server=request.getfixturevalue("server") if where == "push" else None)
    assert p.returncode == 0, p.stdout + p.stderr
    secret = dst / "home" / "private" / "secret"
    assert secret.read_bytes() == b"top secret\n"
    got = as_nobody("cat", str(secret))
    assert got.returncode != 0 and "top secret" not in got.stdout
    assert acl_names(secret) == [] and acl_names(secret.parent) == []
    assert (dst / "home").stat().st_uid == NOBODY


def test_a_directory_more_open_than_the_sources_shows_nothing_written_in_it(
        shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DST directory of the right owner, but 0755 where SRC's is 0700 (SRC's was closed
    since the last sync): SRC's 0644 file in it, which only the directory guarded, was put
    in place while the directory still let everyone in, so any user could open it then and
    keep it open. It is now made 0700 before anything is written in it; SRC's mode at the
    end. Here user nobody tries right after the file is put in place."""
    src, dst = shared_dir / "src", shared_dir / "dst"
    (src / "private").mkdir(parents=True)
    (src / "private" / "secret").write_bytes(b"top secret\n")
    (src / "private" / "secret").chmod(0o644)
    (src / "private").chmod(0o700)
    (dst / "private").mkdir(parents=True)
    for d in (src, dst, dst / "private"):
        d.chmod(0o755)
    secret = dst / "private" / "secret"
    seen: list[str] = []
    real = Receiver.install

    def install(self: Receiver, dfd: int, where: Where, name: bytes, *a: Any, **kw: Any) -> None:
        real(self, dfd, where, name, *a, **kw)
        if name == b"secret":
            seen.append(as_nobody("cat", str(secret)).stdout)

    monkeypatch.setattr(Receiver, "install", install)
    assert Syncer(src, dst, SyncOptions(processes=1)).run().problems == []
    assert seen == [""]  # the attacker read nothing
    assert secret.read_bytes() == b"top secret\n"
    assert stat.S_IMODE((dst / "private").stat().st_mode) == 0o700


def _reader_as_nobody(path: Path) -> tuple[int, int, int]:
    """A process of user nobody holding ``path`` open (as anyone may while it is 0644),
    which reads it through that fd when told: (pid, fd to tell it, fd to read its sha256)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def read_when_told() -> None:
        fd = os.open(path, os.O_RDONLY)
        os.write(ready_w, b"1")
        os.read(go_r, 1)
        os.write(ready_w, hashlib.sha256(os.pread(fd, 1 << 24, 0)).hexdigest().encode())

    pid = fork_as_nobody(read_when_told)
    os.close(ready_w)
    os.close(go_r)
    assert os.read(ready_r, 1) == b"1"
    return pid, go_w, ready_r


def test_inplace_never_writes_into_a_file_others_may_read_that_src_closed(shared_dir: Path) -> None:
    """--inplace wrote SRC's changed pages into DST's file as it was: one that SRC has since
    made 0600 was still 0644 in DST, so anyone who had opened it (as anyone could) read
    SRC's new bytes through their fd. Such a file is now written anew, as without --inplace."""
    src, dst = shared_dir / "src", shared_dir / "dst"
    src.mkdir(mode=0o755)
    old = os.urandom(4 * MiB)
    (src / "db").write_bytes(old)
    (src / "db").chmod(0o644)
    opts = SyncOptions(processes=1, inplace=True)
    assert Syncer(src, dst, opts).run().problems == []
    with open(src / "db", "r+b") as f:
        f.write(b"top secret, now\n")
    (src / "db").chmod(0o600)
    pid, go, answer = _reader_as_nobody(dst / "db")
    try:
        assert Syncer(src, dst, opts).run().problems == []
        os.write(go, b"1")
        seen = os.read(answer, 64).decode()
    finally:
        os.close(go)
        os.close(answer)
        os.waitpid(pid, 0)
    assert seen == hashlib.sha256(old).hexdigest()  # the reader's fd still shows the old file only
    assert (dst / "db").read_bytes() == (src / "db").read_bytes()
    assert stat.S_IMODE((dst / "db").stat().st_mode) == 0o600


def _swap_as_nobody(d: Path, tmp: bytes) -> None:
    """User nobody, who may write in ``d``, renames the sync's temp file ``tmp`` away and
    their own file "evil" to its name."""
    def swap() -> None:
        os.rename(d / os.fsdecode(tmp), d / "stolen")
        os.rename(d / "evil", d / os.fsdecode(tmp))

    _, status = os.waitpid(fork_as_nobody(swap), 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _shared_tree(shared_dir: Path) -> tuple[Path, Path, int]:
    """SRC and DST 0777 (DST's directory as SRC's: not taken, others may write in it), SRC
    with "prog" (setuid) and "other"; nobody's "evil" planted in DST. Returns its inode."""
    src, dst = shared_dir / "src", shared_dir / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "prog").write_bytes(REAL)
    (src / "prog").chmod(0o4755)
    (src / "other").write_bytes(b"other\n")
    for d in (src, dst):
        d.chmod(0o777)
    return src, dst, _plant_as_nobody(dst / "evil", EVIL, 0)


def _sync_refuses_prog(src: Path, dst: Path, log: Path) -> None:
    """A sync that names "prog" as not installed (a per-file error, in the log too) and
    syncs "other"."""
    problems = Syncer(src, dst, SyncOptions(processes=1), log=SyncLog(log)).run().problems
    _refused(dst, log, [(p.path, p.kind, p.message) for p in problems])


def _refused(dst: Path, log: Path, problems: list[tuple[str, str, str]]) -> None:
    assert [p[:2] for p in problems] == [("prog", "write")], problems
    assert "not installed: replaced during the run" in problems[0][2]
    errors = {f[5]: f[6] for f in (ln.split("\t") for ln in log.read_text().splitlines()) if f[1] == "error"}
    assert errors == {"prog": f"write: {problems[0][2]}"}
    assert (dst / "other").read_bytes() == b"other\n"


def test_a_temp_file_swapped_before_its_rename_is_not_installed(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver renamed its temp file into place by name: user nobody, who may write in
    DST's directory, renamed it away after it was written and their own file to its name,
    which was installed as SRC's "prog" and logged as copied. The temp name must now be the
    file written (fstat of our fd against fstatat of the name) right before the rename:
    refused, named in the log, the other files synced. Here nobody swaps right before."""
    src, dst, evil = _shared_tree(shared_dir)
    real = Receiver.install

    def install(self: Receiver, dfd: int, where: Where, name: bytes, rel: bytes, st: os.stat_result,
                staged: Any, **kw: Any) -> None:
        if name == b"prog":
            _swap_as_nobody(dst, staged.tmp)
        real(self, dfd, where, name, rel, st, staged, **kw)

    monkeypatch.setattr(Receiver, "install", install)
    _sync_refuses_prog(src, dst, shared_dir / "sync.log")
    assert not (dst / "prog").exists()  # never nobody's file under SRC's name
    assert (dst / "stolen").read_bytes() == REAL and (dst / "stolen").stat().st_uid == 0
    assert [p.stat().st_ino for p in dst.glob(".dv-sync-*")] == [evil]  # theirs, left alone


def test_a_temp_file_swapped_between_the_check_and_the_rename_is_named(
        shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same swap in the window left: after the temp name was checked, before renameat.
    The name must then be the file written right after the rename: refused and named as
    in restore (what nobody put there is left alone, never taken as SRC's: the next run
    replaces it)."""
    src, dst, evil = _shared_tree(shared_dir)
    real = dirfd.lstat_at

    def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
        st = real(dir_fd, name)
        if name.startswith(TEMP_PREFIX) and name.endswith(b".prog"):
            _swap_as_nobody(dst, name)  # (the check has seen our file)
        return st

    monkeypatch.setattr(dirfd, "lstat_at", lstat_at)
    _sync_refuses_prog(src, dst, shared_dir / "sync.log")
    assert (dst / "prog").stat().st_ino == evil
    monkeypatch.undo()
    assert Syncer(src, dst, SyncOptions(processes=1)).run().problems == []
    st = (dst / "prog").stat()
    assert (dst / "prog").read_bytes() == REAL and st.st_ino != evil and st.st_uid == 0


# The agent, run through the suite's sshd with this hook, has user nobody swap the temp
# file of "prog" right before it installs it (as the local test's hook does).
AGENT_SWAP = """
import os, runpy, subprocess, sys
from deltavault.sync.receiver import core
real = core.Receiver.install
SWAP = "import os, sys; d, t = sys.argv[1:]; os.rename(d + '/' + t, d + '/stolen'); os.rename(d + '/evil', d + '/' + t)"
def install(self, dfd, where, name, rel, st, staged, **kw):
    if name == b"prog":
        subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", SWAP,
                        os.readlink(f"/proc/self/fd/{dfd}"), os.fsdecode(staged.tmp)], check=True)
    return real(self, dfd, where, name, rel, st, staged, **kw)
core.Receiver.install = install
runpy.run_module("deltavault", run_name="__main__", alter_sys=True)
"""


@no_sshd
def test_a_temp_file_swapped_before_the_agent_renames_it_is_not_installed(shared_dir: Path,
                                                                           request: pytest.FixtureRequest) -> None:
    """The same swap in DST of a push: the agent writes DST through the same receiver."""
    src, dst, evil = _shared_tree(shared_dir)
    log = shared_dir / "sync.log"
    p = sync(src, dst, "--log", str(log), server=request.getfixturevalue("server"),
             remote=REMOTE.replace("-m deltavault", "-c " + shlex.quote(AGENT_SWAP)))
    assert p.returncode == 3, p.stdout + p.stderr
    _refused(dst, log, [(x["path"], x["kind"], x["message"]) for x in summary(p)["problems"]])
    assert not (dst / "prog").exists() and (dst / "stolen").read_bytes() == REAL
    assert [q.stat().st_ino for q in dst.glob(".dv-sync-*")] == [evil]
