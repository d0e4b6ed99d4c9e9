"""The local cache cannot inject content (issue #12, point 5).

Each attack is run for real: the catalog is rewritten with sqlite3 as an attacker with
write access to it would, another user (a forked child that drops to uid/gid 65534) makes
the cache directory under umask 000, a symlink stands where the cache directory should be.
Without the defences, the tampered-row tests restore the attacker's bytes while
``restore --verify`` and ``check --read-data`` succeed.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from deltavault.backends.local import LocalBackend
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.chunking.pages import DIGEST
from deltavault.model.nodes import Tree
from deltavault.progress import NullReporter
from deltavault.repository.repository import Repository
from tests.conftest import FAST_SCRYPT, PASSWORD, Cli, CliResult, needs_root

NOBODY = 65534


def _catalog(cli: Cli) -> Path:
    [path] = cli.cache.rglob("catalog.sqlite")
    return path


def _repo_id(cli: Cli) -> str:
    return str(json.loads((cli.repo / "config").read_bytes())["id"])


def _catalog_notes(r: CliResult) -> list[str]:
    return ([p["message"] for p in r.last("summary")["problems"] if p["kind"] == "catalog"]
            + [w["message"] for w in r.json if w.get("type") == "warning" and "cache directory" in w["message"]])


def _backup(cli: Cli, src: Path, *args: str) -> CliResult:
    r = cli("--json", "backup", *args, str(src))
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _restored(cli: Cli, tmp_path: Path, name: str) -> Path:
    """Restore latest with --verify, run check --read-data; both must pass."""
    out = tmp_path / name
    r = cli("restore", "latest", "--verify", "--target", str(out))
    assert r.returncode == 0 and "all match" in r.stdout, r.stdout + r.stderr
    c = cli("check", "--read-data")
    assert c.returncode == 0, c.stdout + c.stderr
    return out / "src"


def _swap_content(catalog: Path, dirpath: bytes, victim: bytes, donor: bytes) -> None:
    """The attack: the catalog row of ``dirpath`` now says that ``victim`` (unchanged on
    disk) holds ``donor``'s content blobs."""
    db = sqlite3.connect(catalog)
    try:
        ((sid, raw),) = db.execute("SELECT source_id, tree FROM dirs WHERE path=?", (dirpath,)).fetchall()
        tree = msgspec.msgpack.decode(raw, type=Tree)
        by_name = {n.name: n for n in tree.nodes}
        nodes = [msgspec.structs.replace(n, content=by_name[donor].content) if n.name == victim else n
                 for n in tree.nodes]
        db.execute("UPDATE dirs SET tree=? WHERE source_id=? AND path=?",
                   (msgspec.msgpack.encode(Tree(nodes)), sid, dirpath))
        db.commit()
    finally:
        db.close()


def _settled_source(tmp_path: Path, files: dict[str, bytes]) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    time.sleep(2.1)  # out of the racy window: the next run trusts the stat data
    return src


# ---------------------------------------------------------------- authenticated rows

def test_tampered_directory_row_is_refused_and_the_file_read_again(tmp_path: Path, cli: Cli) -> None:
    real, other = os.urandom(200_000), os.urandom(200_000)
    assert cli("init").returncode == 0
    src = _settled_source(tmp_path, {"a": real, "b": other})
    _backup(cli, src)
    _swap_content(_catalog(cli), b"src", b"a", b"b")
    (src / "c").write_bytes(b"new")  # a change in the directory: its tree is written again
    r = _backup(cli, src)
    out = _restored(cli, tmp_path, "out")
    assert (out / "a").read_bytes() == real and (out / "b").read_bytes() == other
    s = r.last("summary")
    assert _catalog_notes(r) == ["entries of the local catalog failed verification (1 directory): something "
                                 "other than deltavault changed it. They were not used (the files in those "
                                 "directories were read again) and were removed from it"], s["problems"]
    assert s["change_source"] == "catalog" and s["bytes_read"] >= len(real) + len(other), s
    # the commit wrote a correct row: the next run trusts it again
    again = _backup(cli, src).last("summary")
    assert again["problems"] == [] and again["change_source"] == "catalog", again
    assert again["files_unmodified"] >= 2, again  # a and b (c is still in the racy window)


def test_text_output_shows_the_warning(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    src = _settled_source(tmp_path, {"a": os.urandom(50_000), "b": os.urandom(50_000)})
    _backup(cli, src)
    _swap_content(_catalog(cli), b"src", b"a", b"b")
    r = cli("backup", str(src))
    assert r.returncode == 0, r.stderr
    assert "warning:    entries of the local catalog failed verification (1 directory)" in r.stdout, r.stdout


@pytest.mark.parametrize("column, value", [
    ("index_files", "index_files || ' index/' || hex(randomblob(32))"),  # makes blobs_trusted
    ("run_start_ns", "run_start_ns + 3600000000000"),  # moves the racy window an hour on
    ("snapshot", "'0000'"),
])
def test_tampered_source_row_is_refused(tmp_path: Path, cli: Cli, column: str, value: str) -> None:
    assert cli("init").returncode == 0
    src = _settled_source(tmp_path, {"a": os.urandom(10_000)})
    _backup(cli, src)
    db = sqlite3.connect(_catalog(cli))
    with db:
        assert db.execute(f"UPDATE sources SET {column} = {value}").rowcount == 1
    db.close()
    r = _backup(cli, src)
    s = r.last("summary")
    assert s["change_source"] == "parent-trees", s  # the catalog's word on the source is not taken
    assert _catalog_notes(r) == ["entries of the local catalog failed verification (1 source record): something "
                                 "other than deltavault changed it. They were not used (this run compared with "
                                 "the previous snapshot's trees instead) and were removed from it"]
    assert _backup(cli, src).last("summary")["change_source"] == "catalog"  # rewritten by the commit


def test_tampered_page_digests_are_refused(tmp_path: Path, cli: Cli) -> None:
    """Page 5 of a large file is rewritten with page 100's bytes, and the catalog's digest of
    page 5 set to page 100's: trusted, the delta read would think page 5 unchanged and keep
    its old bytes in the snapshot."""
    page = 4096
    data = bytearray(os.urandom(4 << 20))
    assert cli("init").returncode == 0
    src = _settled_source(tmp_path, {"big": bytes(data)})
    _backup(cli, src, "--delta-threshold", "1M")
    db = sqlite3.connect(_catalog(cli))
    with db:
        ((bid, dig),) = db.execute("SELECT id, data FROM blobs").fetchall()
        dig = bytearray(dig)
        dig[5 * DIGEST:6 * DIGEST] = dig[100 * DIGEST:101 * DIGEST]
        db.execute("UPDATE blobs SET data=? WHERE id=?", (bytes(dig), bid))
    db.close()
    data[5 * page:6 * page] = data[100 * page:101 * page]
    with open(src / "big", "r+b") as f:
        f.seek(5 * page)
        f.write(data[5 * page:6 * page])
    r = _backup(cli, src, "--delta-threshold", "1M")
    assert (_restored(cli, tmp_path, "out") / "big").read_bytes() == bytes(data)
    assert _catalog_notes(r) == ["entries of the local catalog failed verification (1 page-digest block): "
                                 "something other than deltavault changed it. They were not used (the files they "
                                 "belong to were read in full) and were removed from it"]


def test_an_older_genuine_catalog_copied_back_changes_nothing(tmp_path: Path, cli: Cli) -> None:
    """Replay: the rows authenticate, but a file changed since no longer matches them."""
    assert cli("init").returncode == 0
    src = _settled_source(tmp_path, {"a": b"first version", "b": b"stays"})
    _backup(cli, src)
    cat = _catalog(cli)
    old = tmp_path / "old.sqlite"
    shutil.copyfile(cat, old)
    (src / "a").write_bytes(b"second version")
    time.sleep(2.1)
    _backup(cli, src)
    shutil.copyfile(old, cat)
    r = _backup(cli, src)
    s = r.last("summary")
    assert s["problems"] == [] and (s["files_changed"], s["files_unmodified"]) == (1, 1), s
    assert (_restored(cli, tmp_path, "out") / "a").read_bytes() == b"second version"


# ---------------------------------------------------------------- permissions

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
    assert cli("init").returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    _backup(cli, src)
    (src / "g").write_bytes(b"y")
    _backup(cli, src)
    assert cli("snapshots").returncode == 0
    modes = _all_modes(cli.cache)
    assert len(modes) > 5, modes
    _assert_private(modes, cli.cache)


def test_an_old_readable_cache_is_made_private(tmp_path: Path, cli: Cli) -> None:
    """A cache an older version left 0755/0644 (others could read the names) is tightened."""
    assert cli("init").returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    _backup(cli, src)
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
def shared_dir() -> Iterator[Path]:
    """A directory every user may create entries in, like /tmp (sticky, 1777)."""
    d = Path(tempfile.mkdtemp(prefix="dv-shared-", dir="/tmp"))
    d.chmod(0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


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
    assert cli("init").returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    _backup(cli, src)
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
    assert cli("init").returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    _backup(cli, src)
    cli.cache.chmod(0o777)
    for args in (["snapshots"], ["ls", "latest"], ["restore", "latest", "--target", str(tmp_path / "o")]):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("is writable by group or others (mode 0777): not used in this run") == 1, args
