"""Objects read whole from a local repository that another user can write in: a key file,
index file or snapshot grown to gigabytes (sparse, so it costs no disk), or swapped for a
symlink to /dev/zero, or a FIFO. Each was read whole into memory (/dev/zero: without end;
the FIFO blocked the open for ever). Now the kind's limit (backends/limits.py) refuses it
before reading, or one byte past, and anything but a regular file is refused unopened for
reading (backends/local.py), exit 15."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from bench.sparse_memory import run_measured

from deltavault.backends.limits import INDEX_MAX
from deltavault.errors import ExitCode
from deltavault.repository.pack import PackEntry
from deltavault.repository.repository import Repository
from tests.conftest import Cli, init_and_back_up

MiB = 1024 * 1024
GiB = 1024 * MiB


def _files(repo: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in repo.rglob("*") if p.is_file() and "locks" not in p.parts}


@pytest.mark.parametrize("how", ["sparse", "devzero", "fifo"])
@pytest.mark.parametrize("folder", ["keys", "index", "snapshots"])
def test_a_local_object_of_gigabytes_is_refused(cli: Cli, tmp_path: Path, folder: str, how: str) -> None:
    init_and_back_up(cli, tmp_path / "src", {"a": os.urandom(100_000)})
    target = next((cli.repo / folder).iterdir())
    before = _files(cli.repo)
    kept = tmp_path / "kept"
    target.rename(kept)
    if how == "sparse":
        target.write_bytes(kept.read_bytes())
        os.truncate(target, 2 * GiB)
    elif how == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    r = run_measured([sys.executable, "-m", "deltavault", "ls", "latest", "--no-cache"], cli.env)
    peak = r.peak_main
    assert r.returncode == ExitCode.BACKEND, r.stderr
    assert f"{folder}/" in r.stderr and "refused unread" in r.stderr, r.stderr
    assert peak < 600 * MiB, f"peak RSS {peak >> 20} MiB"
    target.unlink()
    kept.rename(target)
    assert _files(cli.repo) == before
    assert cli("ls", "latest", "--no-cache").returncode == 0


def test_a_planted_key_file_of_gigabytes_locks_no_one_out(cli: Cli, tmp_path: Path) -> None:
    """Beside the real key file, one that is too large is passed over as a damaged one is."""
    init_and_back_up(cli, tmp_path / "src", {"a": b"alpha"})
    planted = cli.repo / "keys" / ("0" * 64)
    planted.touch()
    os.truncate(planted, 2 * GiB)
    r = cli("ls", "latest", "--no-cache")
    assert r.returncode == 0 and "/a" in r.stdout, r.stderr


def test_the_index_writer_splits_a_file_that_readers_would_refuse(make_repo: Callable[..., Repository]) -> None:
    """An index file is written within the readers' limit (INDEX_MAX): a larger one is
    written as several, the last superseding what was asked, all read back."""
    repo = make_repo()
    store = repo.indexes
    assert store.max_file == INDEX_MAX
    store.max_file = 32 * 1024
    packs = [(os.urandom(32), [PackEntry(0, os.urandom(32), i * 100, 100, 100) for i in range(50)])
             for _ in range(60)]
    old = store.write_file(packs[:1])
    last = store.write_file(packs, supersedes=[old])
    names = store.names()
    assert len(names) > 3 and old in names and last in names
    sizes = [len(repo.backend.get(n)) for n in names if n != old]
    assert max(sizes) <= 32 * 1024
    again = make_repo(reopen=True)
    got = {(pid, e) for pid, entries in again.index.entries_by_pack().items() for e in entries}
    assert got == {(pid, e) for pid, entries in packs for e in entries}
