"""A directory another user planted in a restore target, with a default ACL granting them
everything. The restore reused it as it was: every entry it made below inherited the ACL,
and with the snapshot's mode set the ACL mask let the planted user read (0640) files of
directories (0750) they should never reach, after the restore as during it; and the
directory, theirs until its metadata was set last, let them take what was written in it.
Now an existing directory is made the restore's own, 0700, before anything is written in
it, and every entry ends with exactly the snapshot's ACLs."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from deltavault.restore.target import make_dir
from deltavault.testing.hostile import NOBODY
from tests.conftest import Cli, needs_root, needs_tools
from tests.hostileutil import acl_names, as_nobody, plant_acl_dir, secret_tree

pytestmark = [needs_root(), pytest.mark.root, needs_tools("setfacl", "setpriv")]


def test_a_planted_directory_with_a_default_acl_gives_its_maker_nothing(cli: Cli, tmp_path: Path,
                                                                         shared_dir: Path) -> None:
    src = tmp_path / "src"
    secret_tree(src)
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    target = shared_dir / "target"
    target.mkdir()
    target.chmod(0o777)  # a scratch directory others may write in
    planted = target / "src"
    plant_acl_dir(planted)
    r = cli("restore", "latest", "--target", str(target))
    assert r.returncode == 0, r.stdout + r.stderr
    secret = planted / "private" / "secret"
    assert secret.read_bytes() == b"top secret\n"
    p = as_nobody("cat", str(secret))
    assert p.returncode != 0 and "top secret" not in p.stdout, p.stdout
    for path, mode in ((planted, 0o755), (planted / "private", 0o750), (secret, 0o640)):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, mode), path
        assert acl_names(path) == [], path  # the snapshot's entries have none


def test_as_another_user_a_planted_directory_is_refused_not_written_in(shared_dir: Path) -> None:
    """Who is not root cannot take another user's directory: nothing is written in it."""
    target = shared_dir / "target"
    target.mkdir()
    os.chown(target, NOBODY, NOBODY)
    (target / "theirs").mkdir()  # root's, in nobody's restore target
    (target / "mine").mkdir()
    (target / "mine").chmod(0o777)  # nobody's, but others may write in it
    os.chown(target / "mine", NOBODY, NOBODY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
            sub, _ident, made = make_dir(fd, b"mine")
            os.close(sub)
            try:
                make_dir(fd, b"theirs")
            except PermissionError as exc:
                os.write(w, f"{made}|{exc.strerror}".encode())
                code = 0
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0
    assert said == "False|a directory of another user (uid 0) is in the way; nothing is written in it"
    assert stat.S_IMODE((target / "mine").stat().st_mode) == 0o700  # taken: the restore's alone
    assert stat.S_IMODE((target / "theirs").stat().st_mode) == 0o755 and (target / "theirs").stat().st_uid == 0


def test_only_a_directory_others_made_or_reach_is_taken(tmp_path: Path) -> None:
    """A directory of ours that nobody else may write in, and without ACLs (``/etc`` on an
    in-place restore), keeps its mode while the restore writes in it: made 0700 it would shut
    every other user out for the run, and for good if the run were cut short. One writable by
    the group, or with an ACL, is taken."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, mode in ((b"plain", 0o755), (b"groupw", 0o775), (b"acl", 0o755)):
            os.mkdir(name, dir_fd=fd)
            os.chmod(name, mode, dir_fd=fd)
        subprocess.run(["setfacl", "-d", "-m", "u:nobody:rwx", str(tmp_path / "acl")], check=True)
        for name, want in ((b"plain", 0o755), (b"groupw", 0o700), (b"acl", 0o700)):
            sub, _ident, made = make_dir(fd, name)
            os.close(sub)
            assert not made
            assert stat.S_IMODE(os.stat(tmp_path / name.decode()).st_mode) == want, name
        assert acl_names(tmp_path / "acl") == []
    finally:
        os.close(fd)

