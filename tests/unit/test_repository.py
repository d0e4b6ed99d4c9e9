from __future__ import annotations

import os
from pathlib import Path

import pytest

from deltavault.backends.local import LocalBackend
from deltavault.errors import (
    CorruptionError,
    KeyFileDamaged,
    RepositoryExists,
    RepositoryNotFound,
    WrongPassword,
)
from deltavault.model.types import BlobType
from deltavault.repository.pack import pack_name
from deltavault.repository.repository import Repository
from tests.conftest import FAST_SCRYPT, PASSWORD


def test_blob_roundtrip_and_dedup(repo: Repository, make_repo) -> None:
    data = os.urandom(100_000) + b"x" * 100_000
    bid, added = repo.save_blob(BlobType.DATA, data)
    assert added > 0
    again, added2 = repo.save_blob(BlobType.DATA, data)
    assert again == bid and added2 == 0
    repo.flush()
    assert repo.load_blob(bid) == data
    reopened = make_repo(reopen=True)
    assert reopened.load_blob(bid) == data
    assert reopened.index.raw_length(bid) == len(data)


def test_ids_are_keyed_per_repository(make_repo) -> None:
    a, b = make_repo("a"), make_repo("b")
    assert a.blob_id(b"same") != b.blob_id(b"same")
    plain = make_repo("c", encrypted=False)
    import blake3
    assert plain.blob_id(b"same") == blake3.blake3(b"same").digest()


def test_incompressible_blob_is_stored_raw(repo: Repository) -> None:
    data = os.urandom(200_000)
    _, stored = repo.save_blob(BlobType.DATA, data)
    assert stored == len(data) + repo.env.overhead
    text = b"hello world " * 20_000
    _, stored = repo.save_blob(BlobType.DATA, text)
    assert stored < len(text) // 10


def test_wrong_password_and_missing_repo(tmp_path: Path, repo: Repository) -> None:
    backend = LocalBackend(tmp_path / "repo")
    with pytest.raises(WrongPassword):
        Repository.open(backend, lambda: b"wrong")
    with pytest.raises(RepositoryNotFound):
        Repository.open(LocalBackend(tmp_path / "nothing"), lambda: PASSWORD)
    with pytest.raises(RepositoryExists):
        Repository.init(backend, PASSWORD, scrypt=FAST_SCRYPT)


def test_tampered_key_file_is_reported_as_damage(tmp_path: Path, repo: Repository) -> None:
    key = next((tmp_path / "repo" / "keys").iterdir())
    key.write_bytes(key.read_bytes().replace(b'"n":1024', b'"n":2048'))
    with pytest.raises(KeyFileDamaged):
        Repository.open(LocalBackend(tmp_path / "repo"), lambda: PASSWORD)


def test_damaged_blob_is_detected(tmp_path: Path, repo: Repository) -> None:
    bid, _ = repo.save_blob(BlobType.DATA, b"precious" * 1000)
    repo.flush()
    loc = repo.index.lookup(bid)
    assert loc is not None
    path = tmp_path / "repo" / pack_name(loc.pack_id)
    raw = bytearray(path.read_bytes())
    raw[loc.offset + 20] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptionError):
        repo.load_blob(bid)


def test_orphan_packs_are_adopted(tmp_path: Path, make_repo) -> None:
    r = make_repo()
    ids = [r.save_blob(BlobType.DATA, os.urandom(50_000))[0] for _ in range(3)]
    r.flush()
    for f in (tmp_path / "repo" / "index").iterdir():
        f.unlink()  # as if the run died after uploading packs, before writing the index
    r2 = Repository.open(LocalBackend(tmp_path / "repo"), lambda: PASSWORD, use_cache=False)
    assert not any(r2.has_blob(i) for i in ids)
    assert r2.adopt_orphan_packs() == 1
    assert all(r2.load_blob(i) for i in ids)


def test_ctrl_c_inside_a_local_put_leaves_no_temp_file(tmp_path: Path) -> None:
    """Ctrl-C (or SIGTERM, which deltavault turns into the same) lands as KeyboardInterrupt in
    whatever the main thread runs, here a put: its temp file goes too (CI found one left)."""
    import signal

    backend = LocalBackend(tmp_path / "r")
    data = bytes(64 << 20)

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        for attempt in range(20):
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.002)
                backend.put(f"data/{attempt:064x}", data)
            except KeyboardInterrupt:
                break
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        else:
            pytest.fail("the interrupt never landed inside a put")
    finally:
        signal.signal(signal.SIGALRM, old)
    assert not list((tmp_path / "r").rglob(".tmp-*"))


def test_at_exit_no_put_starts_and_those_in_flight_are_abandoned(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The pack uploader is a daemon thread: after Ctrl-C it goes on while the process exits,
    and CI found its temp file left (a put whose open was still under way when the exit
    handler removed the temp files it knew of). Now the exit refuses new puts and waits for
    those in flight, which remove their own temp file."""
    import threading

    from deltavault.backends import local
    from deltavault.errors import BackendError

    writes = local._Writes()
    monkeypatch.setattr(local, "_writes", writes)
    backend = LocalBackend(tmp_path / "r")
    inside, release = threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []

    def slow_write(fd: int) -> None:
        os.write(fd, b"half a pack")
        inside.set()
        release.wait(10)

    def put() -> None:
        try:
            backend._put_with("data/" + "ab" * 32, slow_write)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=put)
    t.start()
    assert inside.wait(10)
    closer = threading.Thread(target=writes.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "the exit did not wait for the put in flight"
    release.set()
    closer.join(10)
    t.join(10)
    assert isinstance(outcome[0], BackendError), outcome  # abandoned, not stored
    with pytest.raises(BackendError, match="exiting"):
        backend.put("data/" + "cd" * 32, b"too late")
    assert [p.name for p in (tmp_path / "r").rglob("*") if p.is_file()] == []
