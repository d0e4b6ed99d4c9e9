from __future__ import annotations

import os
import random
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


def test_loading_a_large_index_holds_one_pack_of_entries_at_a_time(make_repo) -> None:
    # An index file was decoded whole: 230 bytes of objects a blob at once, on top of the 61
    # the index keeps (1M blobs: 270 MB of a no-change backup's 280 MB peak).
    import tracemalloc

    from deltavault.repository.pack import PackEntry

    repo = make_repo()
    packs, per_pack = 200, 1000
    rnd = random.Random(3)
    written = [(rnd.randbytes(32), [PackEntry(int(BlobType.DATA), rnd.randbytes(32), 100 * i, 100, 120)
                                    for i in range(per_pack)]) for _ in range(packs)]
    repo.write_index_file(written)
    tracemalloc.start()
    try:
        reopened = make_repo(reopen=True)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(reopened.index) == packs * per_pack
    assert all(e.id in reopened.index for _pid, entries in written[::50] for e in entries)
    blobs = packs * per_pack
    # The index's own 61 bytes a blob, the file's plaintext and ciphertext (about 45 bytes a
    # blob each, here) and one pack's entries.
    assert peak < 200 * blobs, f"{peak / blobs:.0f} bytes a blob"


def test_an_index_file_with_one_bad_entry_adds_none_of_its_packs(tmp_path: Path, make_repo) -> None:
    # Packs are added one at a time now; every entry is still checked first, so a bad entry
    # in the last pack keeps the file's earlier packs out of the index too.
    from deltavault.errors import FormatError
    from deltavault.repository.pack import PackEntry

    repo = make_repo()
    rnd = random.Random(5)
    good = [(rnd.randbytes(32), [PackEntry(int(BlobType.DATA), rnd.randbytes(32), 10, 5, 5)]) for _ in range(3)]
    bad = (rnd.randbytes(32), [PackEntry(int(BlobType.DATA), rnd.randbytes(32), 10, 0, 5)])  # length 0
    repo.write_index_file([*good, bad])
    reopened = make_repo(reopen=True)  # the index is built at first use, not at open
    for _ in range(2):  # and a failed build leaves no partial index: the next use fails too
        with pytest.raises(FormatError, match="bad pack or blob entry"):
            reopened.has_blob(good[0][1][0].id)
    backend = LocalBackend(tmp_path / "repo", fsync=False)
    tolerant = Repository.open(backend, lambda: PASSWORD, cache_root=tmp_path / "cache", tolerant=True)
    assert len(tolerant.index_errors) == 1 and "bad pack or blob entry" in tolerant.index_errors[0][1]
    assert not any(tolerant.index.has_pack(pid) for pid, _entries in good)
    assert len(tolerant.index) == 0


def _blob_mix(seed: int) -> list[bytes | memoryview]:
    """What a batch of chunks holds: empty, tiny, text, random, a view, duplicates."""
    rnd = random.Random(seed)
    text = b"".join(b"line %d of some text file\n" % i for i in range(4000))
    items: list[bytes | memoryview] = [b"", b"x" * 10, b"ab" * 40, rnd.randbytes(5000), text[:9000],
                                       text, rnd.randbytes(40_000), text[:20_000] + rnd.randbytes(20_000),
                                       memoryview(text)[100:70_000]]
    return [*items, items[5], bytes(items[3])]


def test_sealing_many_gives_the_bytes_of_sealing_each() -> None:
    """seal_many compresses in a few batch calls, at the level seal_parts would pick for
    each item (auto: probed), to the very same bytes."""
    from deltavault.repository.envelope import Envelope

    items = _blob_mix(1)
    for level in (None, 3, -3):
        env = Envelope(None, level=level)
        for compress in (True, False):
            got = env.seal_many(items, compress=compress, aad=b"blob")
            want = [env.seal_parts(x, compress=compress, aad=b"blob") for x in items]
            assert [(bytes(h), bytes(b)) for h, b in got] == [(bytes(h), bytes(b)) for h, b in want]


def test_saving_many_stores_each_once_under_its_own_id(repo: Repository, make_repo) -> None:
    items = _blob_mix(2)
    first = repo.save_blob(BlobType.DATA, items[6])  # already stored: added again by none
    saved = repo.save_blobs(BlobType.DATA, items)
    assert [bid for bid, _ in saved] == [repo.blob_id(x) for x in items]
    assert saved[6] == (first[0], 0)
    assert saved[9][1] == 0 and saved[10][1] == 0  # a duplicate within the batch is stored once
    assert all(n > 0 for i, (_, n) in enumerate(saved) if i not in (6, 9, 10))
    assert repo.save_blobs(BlobType.DATA, items) == [(bid, 0) for bid, _ in saved]
    repo.flush()
    reopened = make_repo(reopen=True)
    for (bid, _), x in zip(saved, items):
        assert reopened.load_blob(bid) == bytes(x)
        assert reopened.index.raw_length(bid) == len(x)


def test_a_batch_fills_packs_as_one_blob_at_a_time_would(make_repo) -> None:
    rnd = random.Random(3)
    items = [rnd.randbytes(rnd.randint(1000, 60_000)) for _ in range(400)]
    one, many = make_repo("one", pack_size=1 << 20), make_repo("many", pack_size=1 << 20)
    for x in items:
        one.save_blob(BlobType.DATA, x)
    for i in range(0, len(items), 64):
        many.save_blobs(BlobType.DATA, items[i:i + 64])
    for r in (one, many):
        r.flush()
    sizes = [sorted(e.length for e in es) for es in one.index.entries_by_pack().values()]
    assert sorted(sizes) == sorted(sorted(e.length for e in es) for es in many.index.entries_by_pack().values())
    assert len(sizes) >= 10


def test_opening_reuses_a_scratch_buffer_safely() -> None:
    """Compressed bodies are decrypted into a per-thread scratch buffer (Envelope.open):
    blobs of growing and shrinking sizes, one larger than the buffer it starts with, and a
    tampered one between them, each open to their own bytes; the scratch never leaks into
    a result."""
    from deltavault.repository.envelope import Envelope
    from deltavault.repository.keys import MasterKey

    env = Envelope(MasterKey.generate())
    rnd = random.Random(7)
    text = b"".join(b"row %d of a table\n" % i for i in range(200_000))
    nibbles = rnd.randbytes(3_000_000).translate(bytes(i & 15 for i in range(256)))  # compresses to ~1.5 MB
    items = [text[:5000], nibbles, text[:100], rnd.randbytes(2000) * 50, text[:40_000]]
    sealed = [env.seal(x, aad=b"blob") for x in items]
    tampered = bytearray(sealed[1])
    tampered[-5] ^= 1
    got = []
    for s in [sealed[0], sealed[1], bytes(tampered), *sealed[2:]]:
        try:
            got.append(env.open(s, aad=b"blob"))
        except CorruptionError:
            got.append(None)
    assert got == [items[0], items[1], None, *items[2:]]
    assert all(isinstance(x, bytes) for x in got if x is not None)
    assert env.open(sealed[0], aad=b"blob") == items[0]  # after the larger one: still its own bytes
    assert len(sealed[1]) > 1 << 20  # larger than the scratch buffer a thread starts with


def test_a_config_mac_with_non_ascii_characters_fails_its_authentication(tmp_path: Path, repo: Repository) -> None:
    """An edited config whose mac is not ASCII is a CorruptionError, on open and for repair,
    not a TypeError out of hmac.compare_digest."""
    import json

    from deltavault.maintenance.config_repair import check_or_rebuild_config

    backend = LocalBackend(tmp_path / "repo")
    cfg = json.loads(backend.get("config"))
    cfg["mac"] = "\u00e9" * 64
    backend.put("config", json.dumps(cfg).encode())
    with pytest.raises(CorruptionError):
        Repository.open(backend, lambda: PASSWORD)
    fixed = check_or_rebuild_config(backend, lambda: PASSWORD, dry_run=True, cache_root=tmp_path / "cache")
    assert fixed.state != "sound"


def test_a_repository_is_not_made_with_a_key_file_it_would_refuse(tmp_path: Path) -> None:
    """parse_key_file refuses scrypt parameters past 256 MiB or 16x the default work; a key
    file asking them was written all the same, and the repository just made could not be
    opened (KeyFileDamaged: 'unsafe KDF parameters'). Now it is refused before anything is
    written."""
    from deltavault.errors import UsageError

    backend = LocalBackend(tmp_path / "strong", fsync=False)
    with pytest.raises(UsageError):
        Repository.init(backend, PASSWORD, scrypt=(16, 1, 2**18 + 1))  # past 16x the default work, cheap
    assert not any(True for _ in backend.list("keys/"))
    with pytest.raises(RepositoryNotFound):
        Repository.open(backend, lambda: PASSWORD)
