"""Bad input: unreadable, vanishing and changing files, a full disk, a wrong password."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltavault.backends.local import LocalBackend
from deltavault.backup.files.content import ContentReader
from deltavault.backup.files.options import FileBackupOptions
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.progress import NullReporter
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli, init_and_back_up, needs_root, needs_tools
from tests.loopdev import fresh_fs
from tests.treeutil import manifest


@needs_root()
@needs_tools("setpriv")
def test_unreadable_files_are_listed_and_the_rest_is_saved(shared_dir: Path, cli: Cli) -> None:
    import json

    src = shared_dir / "src"
    (src / "locked-dir").mkdir(parents=True)
    (src / "ok.txt").write_text("readable")
    (src / "secret.txt").write_text("root only")
    (src / "locked-dir" / "inside").write_text("x")
    (src / "secret.txt").chmod(0o000)
    (src / "locked-dir").chmod(0o000)
    pw = shared_dir / "pw"
    pw.write_text("pw")
    home = shared_dir / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    env = dict(cli.env, DELTAVAULT_REPOSITORY=str(home / "repo"), DELTAVAULT_PASSWORD_FILE=str(pw),
               DELTAVAULT_CACHE_DIR=str(home / "cache"), HOME=str(home),
               XDG_CONFIG_HOME=str(home / "config"))  # its host secret: nobody's own

    def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               sys.executable, "-m", "deltavault", "--json", *args],
                              env=env, capture_output=True, text=True, timeout=300)

    assert as_nobody("init").returncode == 0
    r = as_nobody("backup", str(src))
    assert r.returncode == 3, r.stdout + r.stderr
    summary = [json.loads(x) for x in r.stdout.splitlines() if '"summary"' in x][-1]
    kinds = sorted((p["path"].rsplit("/", 1)[-1], p["kind"]) for p in summary["problems"])
    assert kinds == [("locked-dir", "unreadable"), ("secret.txt", "unreadable")]
    assert summary["files_new"] == 1 and summary["errors"] == 2
    ls = as_nobody("ls", "latest")
    names = sorted(json.loads(x)["path"] for x in ls.stdout.splitlines() if '"node"' in x)
    assert names == ["src", "src/locked-dir", "src/ok.txt"]


class _DeleteOnFirstFile(NullReporter):
    """Deletes other entries as soon as the first file has been read: a real race, made
    deterministic by the walker's sorted order."""

    def __init__(self, victims: list[Path]) -> None:
        self.victims = victims

    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
        while self.victims:
            v = self.victims.pop()
            if v.is_dir():
                import shutil

                shutil.rmtree(v)
            else:
                v.unlink()


def test_vanishing_files_are_reported_and_the_run_goes_on(tmp_path: Path, repo: Repository) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_first").write_text("1")
    (src / "b_victim").write_text("2")
    (src / "c_victim_dir").mkdir()
    (src / "c_victim_dir" / "x").write_text("3")
    (src / "d_last").write_text("4")
    res = run_backup(repo, BackupRequest(paths=[str(src)]),
                     _DeleteOnFirstFile([src / "c_victim_dir", src / "b_victim"]))
    assert sorted((p.path.rsplit("/", 1)[-1], p.kind) for p in res.problems) == [
        ("b_victim", "vanished"), ("c_victim_dir", "vanished")]
    assert res.partial and res.stats.files_new == 2


@contextlib.contextmanager
def _changed_during_every_read(path: Path) -> Iterator[None]:
    """Every read of ``path``'s content by the backup is overlapped by a real write to it,
    made after the reader's first fstat (a thread rewriting it meanwhile could be starved
    for a whole read on a loaded machine, and the read came out clean)."""
    original = ContentReader.read
    fd_w = os.open(path, os.O_WRONLY)
    target = os.stat(path)
    writes = [0]

    def read(self: ContentReader, fd: int, *args: object, **kwargs: object) -> object:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            os.pwrite(fd_w, os.urandom(4096), (writes[0] * 7919 % 4000) * 4096)
            writes[0] += 1
            # a new mtime even where timestamps are coarse (kernels before 6.13: one per tick)
            os.utime(fd_w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        return original(self, fd, *args, **kwargs)  # type: ignore[arg-type]

    ContentReader.read = read  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        ContentReader.read = original  # type: ignore[method-assign]
        os.close(fd_w)


def test_file_changing_while_read_is_retried_then_flagged(tmp_path: Path, repo: Repository) -> None:
    src = tmp_path / "src"
    src.mkdir()
    busy = src / "busy.db"
    busy.write_bytes(os.urandom(4000 * 4096))
    (src / "calm").write_text("calm")
    time.sleep(0.05)  # let "calm" age past the racy window used below
    with _changed_during_every_read(busy):
        res = run_backup(repo, BackupRequest(paths=[str(src)], options=FileBackupOptions(workers=2)))
    assert [(p.path.rsplit("/", 1)[-1], p.kind) for p in res.problems] == [("busy.db", "changed")]
    assert "read" in res.problems[0].message and res.partial
    assert res.stats.files_new == 2  # stored (marked) rather than dropped
    # the next run reads it again: its ctime moved on after the stat we stored
    time.sleep(0.05)
    res2 = run_backup(repo, BackupRequest(paths=[str(src)], options=FileBackupOptions(racy_window_ns=10_000_000)))
    assert res2.stats.files_changed == 1 and res2.stats.files_unmodified == 1 and not res2.problems


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with fresh_fs(tmp_path, "40M", "mkfs.ext4", "-q", "-F", "-m", "0") as mnt:
        yield mnt


@needs_root()
@needs_tools("mkfs.ext4", "losetup")
def test_full_repository_disk_keeps_the_repository_valid(tmp_path: Path, cli: Cli, small_fs: Path) -> None:
    repo_dir = small_fs / "repo"
    env = {"DELTAVAULT_REPOSITORY": str(repo_dir)}
    assert cli("init", env=env).returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(os.urandom(2 << 20))
    time.sleep(0.05)
    assert cli("backup", str(src), env=env).returncode == 0
    first = manifest(src)
    (src / "huge").write_bytes(os.urandom(60 << 20))  # does not fit
    r = cli("--json", "backup", str(src), env=env)
    assert r.returncode == 14, r.stdout + r.stderr
    assert "no space" in r.last("error")["message"]
    c = cli("check", "--read-data", env=env)
    assert c.returncode == 0, c.stdout + c.stderr
    out = tmp_path / "out"
    rr = cli("restore", "latest", "--target", str(out), "--verify", env=env)
    assert rr.returncode == 0, rr.stdout + rr.stderr
    assert manifest(out / "src") == first
    # with room again, the next run succeeds and reuses what the failed run uploaded
    (src / "huge").unlink()
    (src / "mid").write_bytes(os.urandom(10 << 20))
    r2 = cli("--json", "backup", str(src), env=env)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert cli("check", "--read-data", env=env).returncode == 0


def test_wrong_password_changes_nothing(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "src"
    init_and_back_up(cli, src, {"f": b"x"})

    def state() -> list[tuple[str, int, int]]:
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in cli.repo.rglob("*"))

    before = state()
    for args in (["backup", str(src)], ["snapshots"], ["restore", "latest", "--target", str(tmp_path / "o")],
                 ["check"]):
        r = cli(*args, env={"DELTAVAULT_PASSWORD": "not the password"})
        assert r.returncode == 12, (args, r.stderr)
        assert "wrong password" in r.stderr
    assert state() == before
    assert not (tmp_path / "o").exists()


def test_unusable_restore_target_or_sync_destination_gives_exit_17(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "src"
    init_and_back_up(cli, src, {"f": b"x"})
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    for target, says in ((a_file, "exists and is not a directory"), (a_file / "sub", "a parent is not a directory"),
                         (Path("/proc/no-such-dir"), "cannot create")):
        r = cli("restore", "latest", "--target", str(target))
        assert r.returncode == 17 and says in r.stderr and "internal error" not in r.stderr, r.stderr
        s = cli("sync", str(src), str(target))
        assert s.returncode == 17 and says in s.stderr and "synced" not in s.stdout, s.stdout + s.stderr
    assert a_file.read_text() == "not a directory"


def _catalog_paths(cli: Cli) -> list[Path]:
    return list(cli.cache.rglob("catalog.sqlite"))


def test_a_damaged_catalog_costs_speed_not_the_backup(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "src"
    init_and_back_up(cli, src, {"f": os.urandom(100_000)}, settle=True)
    [catalog] = _catalog_paths(cli)
    catalog.write_bytes(b"this is not an SQLite database" * 100)
    for ext in ("-wal", "-shm"):
        Path(f"{catalog}{ext}").unlink(missing_ok=True)
    (src / "g").write_bytes(os.urandom(1000))
    r = cli("--json", "backup", str(src))
    assert r.returncode == 0, r.stdout + r.stderr
    summary = r.last("summary")
    assert summary["change_source"] == "parent-trees"
    assert (summary["files_new"], summary["files_unmodified"]) == (1, 1), summary  # f was not read again
    assert [p["kind"] for p in summary["problems"]] == ["catalog"]
    assert "started a new one" in summary["problems"][0]["message"]
    # the damaged file was replaced: the next run uses the new catalog again
    again = cli("--json", "backup", str(src)).last("summary")
    assert again["change_source"] == "catalog" and again["problems"] == []
    out = tmp_path / "out"
    assert cli("restore", "latest", "--target", str(out)).returncode == 0
    assert manifest(out / "src") == manifest(src)


@needs_root()
@needs_tools("mount")
def test_full_cache_disk_keeps_the_snapshot(tmp_path: Path, cli: Cli) -> None:
    cache = tmp_path / "smallcache"
    cache.mkdir()
    # mode=0700: a cache root others may write in (tmpfs defaults to 1777) is not used at all
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(cache)], check=True)
    try:
        env = {"DELTAVAULT_CACHE_DIR": str(cache)}
        assert cli("init", env=env).returncode == 0
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_bytes(os.urandom(10_000))
        assert cli("backup", str(src), env=env).returncode == 0
        fill = cache / "fill"
        fd = os.open(fill, os.O_WRONLY | os.O_CREAT)  # fill the cache disk to the last byte
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        for i in range(200):
            (src / f"d{i}").mkdir()
            (src / f"d{i}" / "x").write_bytes(os.urandom(3000))
        r = cli("--json", "backup", str(src), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        notes = [p["message"] for p in r.last("summary")["problems"] if p["kind"] == "catalog"]
        assert notes and "not used" not in " ".join(notes), notes
        fill.unlink()
        out = tmp_path / "out"
        assert cli("restore", "latest", "--target", str(out), env=env).returncode == 0
        assert manifest(out / "src") == manifest(src)
        assert cli("check", "--read-data", env=env).returncode == 0
    finally:
        subprocess.run(["umount", str(cache)], check=True)


@needs_root()
@needs_tools("mount", "umount")
def test_a_read_only_repository_can_be_restored_and_checked(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "src"
    init_and_back_up(cli, src, {"f": os.urandom(300_000)})
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(cli.repo), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        env = {"DELTAVAULT_REPOSITORY": str(ro)}
        r = cli("restore", "latest", "--target", str(tmp_path / "out"), env=env)
        assert r.returncode == 0 and "read-only file system: reading without a lock" in r.stderr, r.stderr
        assert manifest(tmp_path / "out" / "src") == manifest(src)
        c = cli("check", "--read-data", env=env)
        assert c.returncode == 0 and "no errors found" in c.stdout, c.stdout + c.stderr
        b = cli("backup", str(src), env=env)  # writing needs a writable repository
        assert b.returncode == 15 and "Read-only file system" in b.stderr, b.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    # --no-lock: for a repository one may read but not write (permissions, WORM storage); it
    # also skips waiting for an exclusive lock, so test it against one held here
    holder = Repository.open(LocalBackend(cli.repo), lambda: PASSWORD, use_cache=False)
    with holder.lock(exclusive=True, command="test"):
        assert cli("restore", "latest", "--target", str(tmp_path / "out2")).returncode == 11
        r = cli("--no-lock", "restore", "latest", "--target", str(tmp_path / "out3"))
        assert r.returncode == 0, r.stderr
    assert manifest(tmp_path / "out3" / "src") == manifest(src)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_backup_exits_130_and_leaves_a_clean_repository(tmp_path: Path, cli: Cli,
                                                                     sig: signal.Signals) -> None:
    assert cli("init", "--pack-size", "4M").returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    for i in range(24):
        (src / f"f{i}").write_bytes(os.urandom(8 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "deltavault", "backup", str(src)], env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(p.is_file() and not p.name.startswith(".tmp") for p in (cli.repo / "data").rglob("*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the backup ended before any pack"
        time.sleep(0.01)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=120)
    # the signal comes after the first 4 MiB pack of 192 MiB, so the run cannot have finished
    assert proc.returncode == 130 and "interrupted" in err, err
    assert "Traceback" not in err, err
    assert not list(cli.repo.rglob(".tmp-*")), "an interrupted put left its temp file"
    assert not list((cli.repo / "locks").iterdir()), "the lock was not released"
    assert cli("check", "--read-data").returncode == 0
    r = cli("--json", "backup", str(src))
    assert r.returncode == 0, r.stderr
    assert r.last("summary")["bytes_added"] < 192 << 20  # what the interrupted run uploaded is reused


def test_catalog_damaged_mid_file_costs_a_reread_and_is_replaced(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    src = tmp_path / "src"
    for i in range(2000):
        (src / f"d{i}").mkdir(parents=True)
        (src / f"d{i}" / "f").write_text(str(i))
    time.sleep(2.1)  # out of the racy window
    assert cli("backup", str(src)).returncode == 0
    [catalog] = _catalog_paths(cli)
    size = catalog.stat().st_size
    with open(catalog, "r+b") as f:  # the header and schema still read; the rows do not
        f.seek(size // 2)
        f.write(random.Random(3).randbytes(20_000))
    (src / "d5" / "f").write_text("changed")
    r = cli("--json", "backup", str(src))
    assert r.returncode == 0, r.stdout + r.stderr
    notes = [p["message"] for p in r.last("summary")["problems"] if p["kind"] == "catalog"]
    assert notes and "is damaged" in notes[0], r.last("summary")["problems"]
    out = tmp_path / "out"
    assert cli("restore", "latest", "--target", str(out)).returncode == 0
    assert manifest(out / "src") == manifest(src)
    # the damaged catalog was removed: the next run builds a new one, the one after uses it
    assert cli("--json", "backup", str(src)).last("summary")["change_source"] == "parent-trees"
    last = cli("--json", "backup", str(src)).last("summary")
    assert last["change_source"] == "catalog" and last["problems"] == []


@needs_root()
@needs_tools("mkfs.ext4", "losetup")
@pytest.mark.parametrize("layout", ["small files", "one large file"])
def test_full_restore_target_is_exit_14(tmp_path: Path, cli: Cli, layout: str) -> None:
    """Small files are written by the walker in batches and large ones by workers: a full
    target ends the restore with exit 14 either way, and no temporary file is left."""
    src = tmp_path / "src"
    src.mkdir()
    if layout == "small files":
        for i in range(300):
            (src / f"f{i:03}").write_bytes(os.urandom(100_000))
    else:
        (src / "big").write_bytes(os.urandom(30 << 20))
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    target = tmp_path / "target"
    target.mkdir()
    with fresh_fs(target, "12M", "mkfs.ext4", "-q", "-F", "-m", "0") as mnt:
        r = cli("--json", "restore", "latest", "--target", str(mnt / "out"))
        assert r.returncode == 14, r.stdout + r.stderr
        assert "restore target is full" in r.last("error")["message"]
        left = [p.name for p in (mnt / "out").rglob("*") if p.name.startswith(".dv-restore-")]
        assert left == []
