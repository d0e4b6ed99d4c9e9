"""A key file of another repository in this one's store. Users give two repositories the
same password (a laptop's and a desktop's), and a key file is readable by whoever can read
the store: planted beside this repository's key (or copied there by mistake) under a name
that sorts first, it opens with the password, and its master key was taken as this
repository's. Every command then ended with "config fails its authentication ... 'deltavault
repair' rebuilds it", and that repair rebuilt the config under the other key, found every
pack, index file and snapshot "damaged" and deleted them all. Now the master key is the
one the config is authenticated with, and a rebuilt config takes the key this repository's
snapshots and index files open with (refusing when that is not one key)."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest

from deltavault.repository.keys import KeyFile, MasterKey, make_key_file
from tests.conftest import FAST_SCRYPT, Cli
from tests.hostileutil import stored_files

FIRST = "keys/" + "0" * 64  # sorts before any key file's own name


def _two_repositories(cli: Cli, tmp_path: Path) -> tuple[Path, Path]:
    """This repository, backed up once, and another made with the same password; returns
    the source and the other repository."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "mine.txt").write_bytes(b"this repository's file " * 500)
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    other = tmp_path / "other"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "theirs.txt").write_bytes(b"the other repository's file")
    env = {"DELTAVAULT_REPOSITORY": str(other), "DELTAVAULT_CACHE_DIR": str(tmp_path / "other-cache")}
    assert cli("init", env=env).returncode == 0
    assert cli("backup", str(theirs), env=env).returncode == 0
    return src, other


def _plant_key(cli: Cli, other: Path) -> None:
    (key,) = (other / "keys").iterdir()
    shutil.copyfile(key, cli.repo / FIRST)


def _restores(cli: Cli, src: Path, out: Path) -> None:
    r = cli("restore", "latest", "--target", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "src" / "mine.txt").read_bytes() == (src / "mine.txt").read_bytes()


def test_another_repositorys_key_file_beside_this_ones_changes_nothing(cli: Cli, tmp_path: Path) -> None:
    src, other = _two_repositories(cli, tmp_path)
    _plant_key(cli, other)
    for args in (["snapshots"], ["backup", str(src)], ["check", "--read-data"], ["repair", "--dry-run"]):
        r = cli(*args)
        assert r.returncode == 0, (args, r.stdout + r.stderr)
    _restores(cli, src, tmp_path / "out")
    # the key in use is this repository's own; the other one is listed, and removed
    r = cli("--json", "key", "list")
    assert r.returncode == 0, r.stderr
    current = {k["id"]: k["current"] for k in r.json if k.get("type") == "key"}
    (own,) = (p.name for p in (cli.repo / "keys").iterdir() if p.name != FIRST.removeprefix("keys/"))
    assert current == {own: True, FIRST.removeprefix("keys/"): False}
    assert cli("key", "remove", FIRST.removeprefix("keys/")[:12]).returncode == 0
    assert [p.name for p in (cli.repo / "keys").iterdir()] == [own]
    _restores(cli, src, tmp_path / "out2")


def test_repair_with_only_another_repositorys_key_file_changes_nothing(cli: Cli, tmp_path: Path) -> None:
    src, other = _two_repositories(cli, tmp_path)
    (own,) = (cli.repo / "keys").iterdir()
    shutil.move(own, tmp_path / "own-key")  # this repository's key gone, the other's in its place
    _plant_key(cli, other)
    before = stored_files(cli.repo)
    r = cli("snapshots")
    assert r.returncode == 13 and "another repository" in r.stderr, r.stderr
    for args in (["repair"], ["repair", "--dry-run"], ["repair", "--rewrite-snapshots"]):
        r = cli(*args)
        assert r.returncode == 13 and "cannot be rebuilt" in r.stderr and "another repository" in r.stderr, (
            args, r.stdout + r.stderr)
    assert stored_files(cli.repo) == before  # no pack, index file or snapshot deleted, no config written
    (cli.repo / FIRST).unlink()
    shutil.move(tmp_path / "own-key", own)
    assert cli("check", "--read-data").returncode == 0
    _restores(cli, src, tmp_path / "out")


def test_a_damaged_config_is_rebuilt_with_this_repositorys_key_not_anothers(cli: Cli, tmp_path: Path) -> None:
    src, other = _two_repositories(cli, tmp_path)
    _plant_key(cli, other)
    good = (cli.repo / "config").read_bytes()
    (cli.repo / "config").write_bytes(good[:-20])  # cut short: does not parse
    r = cli("repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (cli.repo / "config").read_bytes() == good
    assert cli("check", "--read-data").returncode == 0
    _restores(cli, src, tmp_path / "out")


def test_a_config_cannot_be_rebuilt_when_objects_of_both_repositories_are_here(cli: Cli, tmp_path: Path) -> None:
    _src, other = _two_repositories(cli, tmp_path)
    _plant_key(cli, other)
    for sub in ("snapshots", "index"):
        for f in (other / sub).iterdir():
            shutil.copyfile(f, cli.repo / sub / f.name)
    (cli.repo / "config").unlink()
    before = stored_files(cli.repo)
    r = cli("repair")
    assert r.returncode == 13 and "cannot be rebuilt" in r.stderr and "open with 2" in r.stderr, r.stderr
    assert stored_files(cli.repo) == before


@pytest.mark.memory_limit
def test_a_key_file_asking_gigabytes_of_the_key_derivation_is_passed_over(cli: Cli, tmp_path: Path) -> None:
    """A key file's scrypt parameters are the store's to choose, and the derivation runs for
    each key file before a password is found wrong: one asking n=2**21, r=8 (2 GiB; the
    bounds allowed up to 32 GiB and an hour) sorted first and ended every command with the
    kernel's OOM killer (under 143 MiB here). It is now refused as damaged, unread further,
    and the repository's own key opens it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data" * 1000)
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    kf = msgspec.json.decode(make_key_file(MasterKey.generate(), b"other", FAST_SCRYPT), type=KeyFile)
    kf.n, kf.r, kf.p = 2**21, 8, 1
    kf.checksum = kf._body_digest()  # its own checksum agrees: only its parameters are hostile
    (cli.repo / FIRST).write_bytes(msgspec.json.encode(kf))
    for args in (["snapshots"], ["backup", str(src)], ["check"]):
        r = cli(*args)
        assert r.returncode == 0, (args, r.stdout + r.stderr)
    r = cli("key", "list")
    assert r.returncode == 0 and "unsafe KDF parameters" in r.stdout, r.stdout + r.stderr
