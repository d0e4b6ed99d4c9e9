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
from typing import Any

import msgspec
import pytest

import deltavault.restore.regular as regular_mod
from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from deltavault.restore.target import make_dir
from deltavault.testing.hostile import NOBODY
from tests.conftest import Cli, needs_root, needs_tools
from tests.hostileutil import acl_names, as_nobody, one_dir_snapshot, plant_acl_dir, secret_tree

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



def test_a_directory_more_open_than_the_snapshots_shows_nothing_written_in_it(
        shared_dir: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory already in the target, ours and writable only by us, but 0755 where the
    snapshot's is 0700 (an earlier restore of an older snapshot): its 0644 file, which only
    the directory guarded, was put in place while the directory still let everyone in, so
    any user could open it then, and keep it open. Such a directory is now made 0700 before
    anything is written in it. Here user nobody tries right after the file is put in place."""
    bid, _ = repo.save_blob(BlobType.DATA, b"top secret\n")
    sub, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree([
        Node(name=b"secret", type=NodeType.FILE, mode=0o644, size=11, content=[Full(bid, 11)])])))
    root = one_dir_snapshot(repo, [Node(name=b"private", type=NodeType.DIR, mode=0o700, subtree=sub)])
    out = shared_dir / "out"
    (out / "src" / "private").mkdir(parents=True)
    for d in (out, out / "src", out / "src" / "private"):
        d.chmod(0o755)
    secret = out / "src" / "private" / "secret"
    seen: list[str] = []
    real = regular_mod.install

    def install(parent: int, tmp: bytes, name: bytes, *a: Any, **kw: Any) -> None:
        real(parent, tmp, name, *a, **kw)
        if name == b"secret":
            seen.append(as_nobody("cat", str(secret)).stdout)

    monkeypatch.setattr(regular_mod, "install", install)
    r = FileRestorer(repo, out, RestoreOptions())
    r.run(root)
    assert r.problems == []
    assert seen == [""]  # the attacker read nothing
    assert secret.read_bytes() == b"top secret\n"
    assert stat.S_IMODE((out / "src" / "private").stat().st_mode) == 0o700
