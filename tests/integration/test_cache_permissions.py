"""The local cache's permissions cannot be turned against it (issue #12, point 5): made
under umask 000 it is private, an old readable one is made private, and a cache directory
or catalog another user made, could write, or stands behind a symlink is not used; every
command says so (split from test_cache_hostile.py).

Each attack is run for real: another user (a forked child that drops to uid/gid 65534)
makes the cache directory under umask 000, a symlink stands where it should be.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deltavault.backends.local import LocalBackend
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.progress import NullReporter
from deltavault.repository.repository import Repository
from tests.conftest import FAST_SCRYPT, PASSWORD, Cli, needs_root
from tests.integration.test_cache_hostile import (
    _backup,
    _catalog,
    _catalog_notes,
    _restored,
    _settled_source,
    _swap_content,
)

NOBODY = 65534


def _repo_id(cli: Cli) -> str:
    return str(json.loads((cli.repo / "config").read_bytes())["id"])


def _one_file_backed_up(cli: Cli, tmp_path: Path, data: bytes) -> Path:
    """A new repository with one backup of src, a directory holding f (``data``); returns src."""
    assert cli("init").returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(data)
    _backup(cli, src)
    return src


def _all_modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.lstat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode) | (0o1000000 if p.is_symlink() else 0)
    return out


def _assert_private(modes: dict[str, int], root: Path) -> None:
    for name, mode in modes.items():
        want = 0o700 if (root / name).is_dir() else 0o600
        assert mode == want, f"{name}: {mode:o}, not {want:o}"


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


class _ModesMidRun(NullReporter):
    """Records every mode in the cache while the run holds the catalog open (WAL and
    shared-memory files exist only then)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modes: dict[str, int] = {}

    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
        self.modes.update(_all_modes(self.root))


def test_a_fresh_cache_under_umask_000_is_private(tmp_path: Path, umask_000: None) -> None:
    home = tmp_path / "home"  # the cache root's parents are made too, like ~/.cache
    cache = home / ".cache" / "deltavault"
    repo = Repository.init(LocalBackend(tmp_path / "repo", fsync=False), PASSWORD, scrypt=FAST_SCRYPT,
                           cache_root=cache)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(1000))
    run_backup(repo, BackupRequest(paths=[str(src)]))
    reporter = _ModesMidRun(home / ".cache")
    (src / "f0").write_bytes(b"changed")
    run_backup(repo, BackupRequest(paths=[str(src)]), reporter)
    assert repo.cache_dir is not None
    names = set(reporter.modes)
    rel = repo.cache_dir.relative_to(home / ".cache")
    for f in ("catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"):
        assert str(rel / f) in names, sorted(names)
    assert any(n.startswith(str(rel / "index") + "/") for n in names)
    assert any(n.startswith(str(rel / "snapshots") + "/") for n in names)
    _assert_private(reporter.modes, home / ".cache")
    _assert_private(_all_modes(home / ".cache"), home / ".cache")


def test_cli_under_umask_000_leaves_a_private_cache(tmp_path: Path, cli: Cli, umask_000: None) -> None:
    src = _one_file_backed_up(cli, tmp_path, b"x" * 5000)
    (src / "g").write_bytes(b"y")
    _backup(cli, src)
    assert cli("snapshots").returncode == 0
    modes = _all_modes(cli.cache)
    assert len(modes) > 5, modes
    _assert_private(modes, cli.cache)


def test_an_old_readable_cache_is_made_private(tmp_path: Path, cli: Cli) -> None:
    """A cache an older version left 0755/0644 (others could read the names) is tightened."""
    src = _one_file_backed_up(cli, tmp_path, b"x")
    for p in [cli.cache, *cli.cache.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    _backup(cli, src)
    _assert_private(_all_modes(cli.cache), cli.cache)


def as_nobody(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a forked child that has dropped to uid/gid 65534, under umask 000."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.umask(0)
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def shared_dir(shared_dir: Path) -> Path:
    """The suite's directory outside pytest's private root, made one every user may create
    entries in, like /tmp (sticky, 1777)."""
    shared_dir.chmod(0o1777)
    return shared_dir


def _plant_attack_catalog(cli: Cli, tmp_path: Path, src: Path) -> bytes:
    """An unencrypted repository (no key, so rows carry no tag) backed up once, and a copy
    of its catalog rewritten as in the attack. Returns the tampered catalog's bytes."""
    cli.options = ("--insecure-no-encryption",)
    assert cli("init").returncode == 0
    _backup(cli, src)
    cat = _catalog(cli)
    _swap_content(cat, b"src", b"a", b"b")
    data = cat.read_bytes()
    shutil.rmtree(cli.cache)
    return data


@needs_root()
@pytest.mark.parametrize("who", ["cache root", "repository's directory"])
def test_a_cache_made_0777_by_another_user_is_not_used(tmp_path: Path, cli: Cli, shared_dir: Path,
                                                       who: str) -> None:
    """Another user makes the cache directory (0777, umask 000) and plants a catalog that
    says file a holds b's content. Its owner and mode refuse it: nothing in it is read."""
    real, other = os.urandom(100_000), os.urandom(100_000)
    src = _settled_source(tmp_path, {"a": real, "b": other})
    planted = _plant_attack_catalog(cli, tmp_path, src)
    rid = _repo_id(cli)
    if who == "cache root":
        cache = shared_dir / "cache"
        target = cache / rid
    else:
        cache = shared_dir / "mycache"
        cache.mkdir()
        cache.chmod(0o755)  # as an older version left it: ours, others may only enter
        target = cache / rid
        target.mkdir()
        os.chown(target, NOBODY, NOBODY)  # left from when the root was open to others
        target.chmod(0o777)

    def attack() -> None:
        target.mkdir(parents=True, exist_ok=True)
        (target / "catalog.sqlite").write_bytes(planted)

    as_nobody(attack)
    refused = cache if who == "cache root" else target
    assert refused.stat().st_uid == NOBODY and stat.S_IMODE(refused.stat().st_mode) == 0o777
    env = {"DELTAVAULT_CACHE_DIR": str(cache)}
    (src / "c").write_bytes(b"new")
    r = cli("--json", "backup", str(src), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out"
    v = cli("restore", "latest", "--verify", "--target", str(out), env=env)
    assert v.returncode == 0, v.stdout + v.stderr
    assert (out / "src" / "a").read_bytes() == real and (out / "src" / "b").read_bytes() == other
    s = r.last("summary")
    assert s["change_source"] == "parent-trees", s
    assert _catalog_notes(r) == [
        f"the cache directory {refused} is owned by another user (uid {NOBODY}): not used in this run, since "
        "another user could change what deltavault reads from it; remove it (deltavault makes a new one) or "
        "choose another with --cache-dir or DELTAVAULT_CACHE_DIR"]
    assert sorted(p.name for p in target.iterdir()) == ["catalog.sqlite"]  # nothing of ours went there
    assert (target / "catalog.sqlite").read_bytes() == planted


def test_a_cache_writable_by_others_is_not_used(tmp_path: Path, cli: Cli) -> None:
    src = _one_file_backed_up(cli, tmp_path, b"x")
    cli.cache.chmod(0o777)
    r = _backup(cli, src)
    assert _catalog_notes(r) == [
        f"the cache directory {cli.cache} is writable by group or others (mode 0777): not used in this run, "
        "since another user could change what deltavault reads from it; remove it (deltavault makes a new "
        "one) or choose another with --cache-dir or DELTAVAULT_CACHE_DIR"]
    assert r.last("summary")["change_source"] == "parent-trees"


@pytest.mark.parametrize("where", ["cache root", "repository's directory"])
def test_a_symlinked_cache_directory_is_not_followed(tmp_path: Path, cli: Cli, where: str) -> None:
    assert cli("init").returncode == 0
    rid = _repo_id(cli)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)  # ours and private: only the symlink is wrong
    shutil.rmtree(cli.cache)
    if where == "cache root":
        cli.cache.symlink_to(elsewhere)
        link = cli.cache
    else:
        cli.cache.mkdir(mode=0o700)
        link = cli.cache / rid
        link.symlink_to(elsewhere)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    r = _backup(cli, src)
    assert _catalog_notes(r) == [
        f"the cache directory {link} is a symbolic link, which deltavault does not follow: not used in this "
        "run, since another user could change what deltavault reads from it; remove it (deltavault makes a new "
        "one) or choose another with --cache-dir or DELTAVAULT_CACHE_DIR"]
    assert list(elsewhere.iterdir()) == []
    assert cli("restore", "latest", "--target", str(tmp_path / "out")).returncode == 0
    assert (tmp_path / "out" / "src" / "f").read_bytes() == b"x"


def test_a_catalog_file_others_could_write_is_replaced(tmp_path: Path, cli: Cli) -> None:
    """A catalog file left writable by others (in a directory since made private) may have
    been changed: it is removed and a new one started, for any repository."""
    cli.options = ("--insecure-no-encryption",)
    assert cli("init").returncode == 0
    src = _settled_source(tmp_path, {"a": b"real", "b": b"othr"})
    _backup(cli, src)
    cat = _catalog(cli)
    _swap_content(cat, b"src", b"a", b"b")
    cat.chmod(0o666)
    (src / "c").write_bytes(b"new")
    r = _backup(cli, src)
    assert _catalog_notes(r) == [
        "the local catalog file catalog.sqlite was not this user's alone (another user may have changed it); "
        "deltavault removed it and started a new catalog"]
    assert r.last("summary")["change_source"] == "parent-trees"
    assert (_restored(cli, tmp_path, "out") / "a").read_bytes() == b"real"
    assert stat.S_IMODE(_catalog(cli).stat().st_mode) == 0o600


def test_every_command_says_when_it_did_not_use_the_cache(tmp_path: Path, cli: Cli) -> None:
    _one_file_backed_up(cli, tmp_path, b"x")
    cli.cache.chmod(0o777)
    for args in (["snapshots"], ["ls", "latest"], ["restore", "latest", "--target", str(tmp_path / "o")]):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("is writable by group or others (mode 0777): not used in this run") == 1, args
