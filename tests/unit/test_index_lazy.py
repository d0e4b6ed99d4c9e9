"""The index is built at first use, not at open (indexstore.IndexStore._ensure), and a run
that wrote index files leaves the local copy current (IndexStore.save_copy)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deltavault.backends.local import LocalBackend
from deltavault.cli.main import main
from deltavault.model.types import BlobType
from deltavault.repository import indexcache
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, init_small_packs
from tests.unit.test_index_copy import count_decodes

Factory = Callable[..., Repository]


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """What builds an index: each index file decoded (by name) and each read of the copy."""
    seen: list[str] = []
    count_decodes(monkeypatch, seen)
    real_read = indexcache.IndexCopy.read

    def read(self: indexcache.IndexCopy) -> indexcache.Built | None:
        seen.append("copy")
        return real_read(self)

    monkeypatch.setattr(indexcache.IndexCopy, "read", read)
    yield seen


@pytest.fixture
def dv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., list[dict]]:
    """The CLI, in this process (so ``reads`` sees it), on a repository with 1 MiB packs."""
    pw = tmp_path / "password"
    pw.write_text(PASSWORD.decode() + "\n")
    monkeypatch.setenv("DELTAVAULT_REPOSITORY", str(tmp_path / "repo"))
    monkeypatch.setenv("DELTAVAULT_PASSWORD_FILE", str(pw))
    monkeypatch.setenv("DELTAVAULT_CACHE_DIR", str(tmp_path / "cache"))
    init_small_packs(tmp_path / "repo", pw)

    def run(*args: str) -> list[dict]:
        capsys.readouterr()
        rc = main(["--json", *args])
        out = capsys.readouterr()
        assert rc == 0, out.err
        return [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]

    return run


def back_up(dv: Callable[..., list[dict]], src: Path, seed: int) -> None:
    src.mkdir(exist_ok=True)
    for i in range(3):
        (src / f"f{i}").write_bytes(bytes([seed, i]) * 300_000)
    dv("backup", str(src))


def open_repo(tmp_path: Path) -> Repository:
    return Repository.open(LocalBackend(tmp_path / "repo", fsync=False), lambda: PASSWORD,
                           cache_root=tmp_path / "cache")


def test_commands_that_look_no_blob_up_build_no_index(tmp_path: Path, dv: Callable[..., list[dict]],
                                                      reads: list[str]) -> None:
    back_up(dv, tmp_path / "src", 1)
    back_up(dv, tmp_path / "src", 2)
    reads.clear()
    snaps = [o for o in dv("snapshots") if o.get("type") == "snapshot"]
    assert len(snaps) == 2
    sid = snaps[0]["id"]
    dv("tag", "--add", "kept", sid)
    dv("forget", "--keep-last", "1")
    assert reads == []  # no index file decoded and the copy not read
    # A command that needs blobs still gets the whole index after them.
    listed = dv("ls", "latest")
    assert reads and any(o.get("path", "").endswith("f2") for o in listed)
    dv("restore", "latest", "--target", str(tmp_path / "out"))
    assert (tmp_path / "out").rglob("f1")
    restored = next((tmp_path / "out").rglob("f1"))
    assert restored.read_bytes() == bytes([2, 1]) * 300_000


def test_the_first_use_after_a_lock_sees_files_written_after_the_open(make_repo: Factory, tmp_path: Path) -> None:
    writer = make_repo()
    opened = open_repo(tmp_path)  # nothing built yet
    bid, _ = writer.save_blob(BlobType.DATA, b"written after the other process opened")
    writer.flush()
    with opened.lock(command="test"):
        assert opened.has_blob(bid)
        assert opened.load_blob(bid) == b"written after the other process opened"


def test_threads_that_first_use_the_index_together_build_it_once(make_repo: Factory, tmp_path: Path,
                                                                   reads: list[str]) -> None:
    writer = make_repo()
    ids = [writer.save_blob(BlobType.DATA, bytes([i]) * 1000)[0] for i in range(50)]
    writer.flush()
    repo = open_repo(tmp_path)
    reads.clear()
    barrier = threading.Barrier(8)
    found: list[bool] = []

    def use() -> None:
        barrier.wait()
        found.append(all(repo.has_blob(b) for b in ids))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == [True] * 8
    assert reads.count("copy") == 1


def test_the_open_after_a_backup_decodes_no_index_file(tmp_path: Path, dv: Callable[..., list[dict]],
                                                       reads: list[str]) -> None:
    back_up(dv, tmp_path / "src", 1)
    back_up(dv, tmp_path / "src", 2)  # opens from the copy the first left, adds its own files
    reads.clear()
    repo = open_repo(tmp_path)
    assert len(repo.index) > 0
    assert reads == ["copy"] and repo.indexes.from_copy
    assert len(repo.live_index_files()) == len(repo.index_names())
    # The same blobs where one built from the files has them. Positions are the order blobs
    # were added in (the backup's, not the files'): dense in both, equal in neither.
    fresh = Repository.open(LocalBackend(tmp_path / "repo", fsync=False), lambda: PASSWORD, use_cache=False)

    def located(r: Repository) -> list[tuple[bytes, bytes, object]]:
        return sorted(((bid, pack, entry) for bid, pack, entry, _pos in r.index.iter_records()),
                      key=lambda x: x[0])

    assert located(repo) == located(fresh)
    assert sorted(pos for *_r, pos in repo.index.iter_records()) == list(range(len(repo.index)))


def test_a_run_that_superseded_files_leaves_the_copy_alone(make_repo: Factory, tmp_path: Path,
                                                          cache_root: Path) -> None:
    repo = make_repo()
    repo.save_blob(BlobType.DATA, b"one")
    repo.flush()
    assert repo.save_index_copy()
    assert not repo.save_index_copy()  # nothing written since
    old = sorted(repo.live_index_files())
    repo.write_index_file([], supersedes=old)  # what prune and repair do
    assert not repo.save_index_copy()  # its index still holds what the files named
    again = open_repo(tmp_path)
    assert not again.has_blob(repo.blob_id(b"one"))  # rebuilt from the files, not the copy
