"""Packs spooled to a temporary file (the backup's default) are the very bytes an in-memory
pack would be, and reach every backend: the local one by put_file, the others by put."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import blake3
import pytest

from deltavault.backends.base import put_file
from deltavault.backends.counting import CountingBackend
from deltavault.backends.local import LocalBackend
from deltavault.backends.retry import RetryingBackend
from deltavault.errors import NoSpace
from deltavault.model.types import BlobType
from deltavault.repository.envelope import Envelope
from deltavault.repository.pack import PackBuilder, pack_name, read_pack_entries
from deltavault.repository.repository import Repository
from deltavault.testing.memory import MemoryBackend


def _fill(b: PackBuilder, env: Envelope) -> None:
    for i in range(50):
        data = os.urandom(1000 + 997 * i) if i % 2 else bytes([i]) * (5000 + i)
        b.add(BlobType.DATA, blake3.blake3(data).digest(), env.seal_parts(data), len(data))


def test_spooled_pack_equals_the_in_memory_one() -> None:
    env = Envelope(None)
    mem, spool = PackBuilder(), PackBuilder(spool=True)
    state = os.urandom(8)
    for b in (mem, spool):
        # the same blobs in both (sealing unencrypted is deterministic)
        rnd = random.Random(state)
        for i in range(40):
            data = rnd.randbytes(100 + 513 * i)
            b.add(BlobType.DATA, blake3.blake3(data).digest(), env.seal_parts(data), len(data))
    assert len(mem) == len(spool)
    pid, data, entries = mem.finish(env)
    spid, fd, sentries = spool.finish_spooled(env)
    try:
        assert spid == pid and sentries == entries
        assert os.pread(fd, len(data) + 1, 0) == data
    finally:
        spool.discard()
    assert read_pack_entries(env, data, "x") == entries


def test_put_file_local_and_fallback(tmp_path: Path) -> None:
    env = Envelope(None)
    b = PackBuilder(spool=True)
    _fill(b, env)
    pid, fd, _entries = b.finish_spooled(env)
    try:
        local = CountingBackend(RetryingBackend(LocalBackend(tmp_path / "repo")))
        put_file(local, pack_name(pid), fd, len(b))
        mem = MemoryBackend()  # no put_file: read back and put
        put_file(mem, pack_name(pid), fd, len(b))
    finally:
        b.discard()
    stored = (tmp_path / "repo" / pack_name(pid)).read_bytes()
    assert blake3.blake3(stored).digest() == pid and len(stored) == len(b)
    assert mem.get(pack_name(pid)) == stored
    assert local.traffic.bytes_written == len(b) and local.traffic.puts == 1
    assert not [p for p in (tmp_path / "repo").rglob("*") if p.name.startswith(".tmp")]


def test_repository_writes_spooled_packs(repo: Repository, make_repo) -> None:
    """Blobs saved through the repository (spooled packs, several of them) read back."""
    blobs = [os.urandom(300_000) for _ in range(12)]
    repo.writer.pack_size = 1 << 20  # several full packs go through the uploader thread
    ids = [repo.save_blob(BlobType.DATA, d)[0] for d in blobs]
    repo.flush()
    again = make_repo(reopen=True)
    assert [again.load_blob(i) for i in ids] == blobs


def test_full_spool_disk_is_no_space_and_the_pack_stays_whole(make_repo, monkeypatch) -> None:
    """A write to the spool that fails (TMPDIR full) is exit code 14's NoSpace; the blob is
    not left pending, and a retry lands where the failed write would have."""
    repo = make_repo()
    real = os.pwritev
    calls = {"n": 0}

    def failing(fd: int, bufs: list, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 3:  # the MAGIC, the first blob, then this
            real(fd, [memoryview(bufs[0])[:7]], offset)  # a torn write first
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", failing)
    blobs = [os.urandom(5000 + i) for i in range(4)]
    first = repo.save_blob(BlobType.DATA, blobs[0])[0]
    with pytest.raises(NoSpace, match="TMPDIR"):
        repo.save_blob(BlobType.DATA, blobs[1])
    ids = [first] + [repo.save_blob(BlobType.DATA, d)[0] for d in blobs[1:]]
    repo.flush()
    again = make_repo(reopen=True)
    assert [again.load_blob(i) for i in ids] == blobs


def test_a_batch_whose_spool_write_fails_leaves_none_pending(make_repo, monkeypatch) -> None:
    """save_blobs writes a batch to the spool in one go: a failed write is NoSpace, no blob
    of the batch stays pending, and the same batch saved again is stored whole."""
    repo = make_repo()
    real = os.pwritev
    calls = {"n": 0}

    def failing(fd: int, bufs: list, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # the MAGIC, then the batch
            real(fd, [memoryview(bufs[0])[:7]], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", failing)
    blobs = [os.urandom(5000 + i) for i in range(6)]
    with pytest.raises(NoSpace, match="TMPDIR"):
        repo.save_blobs(BlobType.DATA, blobs)
    assert repo.write_stats.blobs_added == 0
    saved = repo.save_blobs(BlobType.DATA, blobs)
    assert all(n > 0 for _, n in saved) and repo.write_stats.blobs_added == len(blobs)
    repo.flush()
    again = make_repo(reopen=True)
    assert [again.load_blob(bid) for bid, _ in saved] == blobs
