"""The snapshot commands on a repository of a few hundred snapshots (issue #18: snapshots,
forget and diff are timed on 10,000 by bench/scale_snapshots.py; here they are checked for
what they say, not timed). The snapshots are the file engine's two real snapshots of a
tiny tree, saved again through Repository.save_snapshot with times 97 minutes apart, as
the benchmark builds them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from deltavault.backends.local import LocalBackend
from deltavault.backup.files.options import FileBackupOptions
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli, init_small_packs

COUNT = 300
STEP_NS = 97 * 60 * 10**9


def _opened(cli: Cli) -> Repository:
    return Repository.open(LocalBackend(cli.repo, fsync=False), lambda: PASSWORD, cache_root=cli.cache)


@pytest.fixture
def many(cli: Cli, tmp_path: Path) -> Iterator[tuple[Cli, list[tuple[str, int]]]]:
    """The CLI on a repository of COUNT snapshots: (id, time_ns), oldest first; even ones
    name the first tree, odd ones the second."""
    init_small_packs(cli.repo, cli.password_file)
    src = tmp_path / "src"
    for i in range(12):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    repo = _opened(cli)
    opts = FileBackupOptions(racy_window_ns=0)
    first = run_backup(repo, BackupRequest(paths=[str(src)], options=opts)).snapshot_id
    (src / "d0" / "f0.txt").write_text("changed\n")
    (src / "d1" / "new.txt").write_text("added\n")
    (src / "d2" / "f2.txt").unlink()
    second = run_backup(repo, BackupRequest(paths=[str(src)], options=opts)).snapshot_id
    assert first and second
    models = [repo.load_snapshot(first), repo.load_snapshot(second)]
    for sid in (first, second):
        repo.delete_snapshot(sid)
    now = datetime.now(UTC).timestamp() * 1e9
    made = []
    for i in range(COUNT):
        t_ns = int(now) - (COUNT - i) * STEP_NS
        when = datetime.fromtimestamp(t_ns / 1e9, UTC).isoformat().replace("+00:00", "Z")
        made.append((repo.save_snapshot(msgspec.structs.replace(models[i % 2], time_ns=t_ns, time=when)), t_ns))
    try:
        yield cli, made
    finally:
        shutil.rmtree(cli.repo, ignore_errors=True)
        shutil.rmtree(cli.cache, ignore_errors=True)


def test_snapshots_forget_and_diff_on_hundreds(many: tuple[Cli, list[tuple[str, int]]]) -> None:
    cli, made = many
    r = cli("--json", "snapshots")
    assert r.returncode == 0, r.stderr
    assert [o["id"] for o in r.json if o["type"] == "snapshot"] == [sid for sid, _ in made]  # oldest first
    text = cli("snapshots")
    assert f"{COUNT} snapshot(s)" in text.stdout
    r = cli("--json", "snapshots", "--latest", "3")
    assert [o["id"] for o in r.json if o["type"] == "snapshot"] == [sid for sid, _ in made[-3:]]

    r = cli("--json", "forget", "--keep-last", "5", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.last("forget_summary") == {"type": "forget_summary", "kept": 5, "removed": COUNT - 5, "dry_run": True}
    kept = {o["snapshot"] for o in r.json if o["type"] == "forget" and o["action"] == "keep"}
    assert kept == {sid for sid, _ in made[-5:]}

    # The calendar rules, against the newest of each local day and ISO week, counted here.
    r = cli("--json", "forget", "--keep-daily", "7", "--keep-weekly", "2", "--dry-run")
    assert r.returncode == 0, r.stderr
    want: set[str] = set()
    for bucket, n in ((lambda d: d.date(), 7), (lambda d: d.isocalendar()[:2], 2)):
        seen: list[object] = []
        for sid, t_ns in reversed(made):
            b = bucket(datetime.fromtimestamp(t_ns / 1e9).astimezone())
            if b not in seen:
                if len(seen) == n:
                    break
                seen.append(b)
                want.add(sid)
    kept = {o["snapshot"] for o in r.json if o["type"] == "forget" and o["action"] == "keep"}
    assert kept == want
    assert r.last("forget_summary")["removed"] == COUNT - len(want)
    assert len(cli("--json", "snapshots").json) == COUNT  # dry runs changed nothing

    a, b = made[-2][0], made[-1][0]  # the first tree, then the second
    r = cli("--json", "diff", a[:8], b[:8])
    assert r.returncode == 0, r.stderr
    changes = {(o["kind"], o["path"]) for o in r.json if o["type"] == "change"}
    assert {k for k, _ in changes} == {"+", "-", "M"}
    assert any(p.endswith("d1/new.txt") for k, p in changes if k == "+")
    assert any(p.endswith("d2/f2.txt") for k, p in changes if k == "-")
    assert any(p.endswith("d0/f0.txt") for k, p in changes if k == "M")


def test_a_damaged_snapshot_among_hundreds(many: tuple[Cli, list[tuple[str, int]]]) -> None:
    """Each snapshot is still authenticated when they are read in a batch: one tampered
    with in the repository (and in the cache) is left out and named; a cache file that
    does not match its name is read again from the repository."""
    cli, made = many
    bad, stale = made[10][0], made[20][0]
    for where in (cli.repo / "snapshots" / bad, *cli.cache.rglob(f"snapshots/{bad}")):
        data = bytearray(where.read_bytes())
        data[-1] ^= 1
        where.write_bytes(bytes(data))
    cached = list(cli.cache.rglob(f"snapshots/{stale}"))
    assert cached
    cached[0].write_bytes(b"not the snapshot")
    r = cli("--json", "snapshots")
    assert r.returncode == 0, r.stderr
    ids = [o["id"] for o in r.json if o["type"] == "snapshot"]
    assert ids == [sid for sid, _ in made if sid != bad]
    assert bad[:8] in r.stdout + r.stderr  # named in a warning
    assert cached[0].read_bytes() == (cli.repo / "snapshots" / stale).read_bytes()  # cached again, right


def test_a_second_listing_in_one_process_reads_nothing_again(many: tuple[Cli, list[tuple[str, int]]]) -> None:
    cli, made = many
    repo = _opened(cli)
    first = repo.list_snapshots()
    assert [sid for sid, _ in first] == [sid for sid, _ in made]
    gets = []
    real = repo.snapshots.cache.fetch_many
    repo.snapshots.cache.fetch_many = lambda folder, leaves, **kw: gets.append(list(leaves)) or real(  # type: ignore[method-assign]
        folder, leaves, **kw)
    repo.delete_snapshot(made[0][0])
    again = repo.list_snapshots()
    assert gets == []
    assert [sid for sid, _ in again] == [sid for sid, _ in made[1:]]
