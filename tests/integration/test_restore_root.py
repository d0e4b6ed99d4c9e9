"""The restore target's root and the path to it, against another local user. The path was
made with makedirs and opened following every symlink: a symlink user nobody planted on it
(``home/restore -> a directory of root's``) had root's restore write there, and with
--delete delete root's files there. A symlink of another user on the path is now refused
(exit 17), nothing touched; root's own are still followed. A root nobody owns stayed theirs
to chmod or give ACLs while root wrote in it; it is now taken for the run (root's, 0700, no
ACLs) and given back as it was at the end, also when the run is cut short."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

import deltavault.restore.regular as regular_mod
from deltavault.errors import DeltavaultError
from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from deltavault.testing.hostile import NOBODY
from tests.conftest import Cli, needs_root, needs_tools
from tests.hostileutil import acl_names, as_nobody, fork_as_nobody, one_dir_snapshot, plant_acl_dir

pytestmark = [needs_root(), pytest.mark.root, needs_tools("setfacl", "setpriv")]


def _nobodys_home(shared_dir: Path) -> tuple[Path, Path]:
    """nobody's home, and a directory of root's holding "keep"."""
    home, precious = shared_dir / "home", shared_dir / "precious"
    precious.mkdir()
    (precious / "keep").write_bytes(b"root's\n")
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    return home, precious


@pytest.mark.parametrize("through", ["leaf", "parent"])
def test_a_symlink_of_another_user_on_the_target_path_is_refused(
        cli: Cli, tmp_path: Path, shared_dir: Path, through: str) -> None:
    """Root restores with --delete into nobody's home/restore (or home/restore/sub, not there
    yet); nobody made restore a symlink to a directory of root's. The restore followed it:
    root's file there was deleted and the snapshot written in its place (and --dry-run
    listed root's file as one it would delete)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data\n")
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    home, precious = _nobodys_home(shared_dir)
    made = as_nobody("ln", "-s", str(precious), str(home / "restore"))
    assert made.returncode == 0, made.stderr
    target = home / "restore" if through == "leaf" else home / "restore" / "sub"
    for dry in (["--dry-run"], []):  # the dry run says what the restore does: refused
        r = cli("restore", "latest", "--target", str(target), "--delete", *dry)
        assert r.returncode == 17, (dry, r.stdout + r.stderr)
        assert "a symlink of another user (uid 65534)" in r.stderr
    assert sorted(os.listdir(precious)) == ["keep"] and (precious / "keep").read_bytes() == b"root's\n"
    (shared_dir / "ours").symlink_to(precious)  # root's own: followed
    r = cli("restore", "latest", "--target", str(shared_dir / "ours" / "sub"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert [p.name for p in (precious / "sub").rglob("f")] == ["f"]


def _snapshot(repo: Repository, files: int) -> bytes:
    """src (0777) holding ``files`` 0640 files."""
    bid, _ = repo.save_blob(BlobType.DATA, b"top secret\n")
    return one_dir_snapshot(repo, [Node(name=b"f%02d" % i, type=NodeType.FILE, mode=0o640, size=11,
                                        content=[Full(bid, 11)]) for i in range(files)])


def _watch(monkeypatch: pytest.MonkeyPatch, target: Path, stop_after: int | None = None) -> list[tuple[int, int]]:
    """After the first file is put in place: whether nobody could give the root an ACL, and
    list it (return codes). ``stop_after``: Ctrl-C once that many files are in place."""
    seen: list[tuple[int, int]] = []
    real = regular_mod.install
    placed = [0]

    def install(parent: int, tmp: bytes, name: bytes, *a: Any, **kw: Any) -> None:
        real(parent, tmp, name, *a, **kw)
        placed[0] += 1
        if not seen:
            seen.append((as_nobody("setfacl", "-m", "u:nobody:rwx", str(target)).returncode,
                         as_nobody("ls", str(target)).returncode))
        if stop_after is not None and placed[0] >= stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(regular_mod, "install", install)
    return seen


def _as_planted(target: Path) -> None:
    """The root is nobody's again, 0777 with the ACLs they gave it, and no more."""
    st = target.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o777)
    assert sorted(acl_names(target)) == ["system.posix_acl_access", "system.posix_acl_default"]
    getfacl = as_nobody("getfacl", "-cp", str(target))
    assert "user:nobody:rwx" in getfacl.stdout and "default:user:nobody:rwx" in getfacl.stdout, getfacl.stdout


def _plant(shared_dir: Path) -> Path:
    home, _precious = _nobodys_home(shared_dir)
    target = home / "restore"
    plant_acl_dir(target)
    assert as_nobody("chmod", "0777", str(target)).returncode == 0
    return target


def test_a_root_another_user_owns_is_taken_for_the_run_and_given_back(
        shared_dir: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """nobody made the target (0777, an ACL and a default ACL giving them all). While root
    restores in it, it is root's, 0700, without ACLs: nobody can neither give it an ACL nor
    list it (they could both). At the end it is theirs again as it was."""
    target = _plant(shared_dir)
    root = _snapshot(repo, 3)
    seen = _watch(monkeypatch, target)
    r = FileRestorer(repo, target, RestoreOptions())
    r.run(root)
    assert r.problems == []
    assert seen == [(1, 2)]  # setfacl and ls refused
    _as_planted(target)
    for f in (target / "src").iterdir():
        assert f.read_bytes() == b"top secret\n" and acl_names(f) == [], f
        assert "top secret" not in as_nobody("cat", str(f)).stdout


def test_a_run_cut_short_gives_the_root_back(shared_dir: Path, repo: Repository,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the second file: the root, taken from nobody for the run, is not left
    root's and 0700 (nobody shut out of their own directory for good), but as they made it;
    what was written in it stays out of their reach."""
    target = _plant(shared_dir)
    root = _snapshot(repo, 6)
    seen = _watch(monkeypatch, target, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        FileRestorer(repo, target, RestoreOptions()).run(root)
    assert seen == [(1, 2)]
    _as_planted(target)
    assert (target / "src").stat().st_uid == 0
    assert "top secret" not in as_nobody("sh", "-c", f"cat '{target}'/src/*").stdout


def test_a_user_cannot_restore_into_a_root_of_another_user(shared_dir: Path, repo: Repository) -> None:
    """Who is not root cannot take another user's target root (root's, open to all): the
    restore is refused (exit 17) before anything is written in it."""
    target = shared_dir / "theirs"
    target.mkdir()
    target.chmod(0o777)
    root = _snapshot(repo, 1)
    r, w = os.pipe()

    def child() -> None:
        os.close(r)
        try:
            FileRestorer(repo, target, RestoreOptions()).run(root)
        except DeltavaultError as exc:
            os.write(w, f"{exc.exit_code}|{exc}".encode())

    pid = fork_as_nobody(child)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0
    code, _, message = said.partition("|")
    assert code == "17" and "belongs to another user (uid 0)" in message, said
    assert os.listdir(target) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o777
