"""A whole restore through the real read-ahead (backends/readahead.py) over a store that
records every read: a large file's segments and batches of small files read their packs at
once, and together they need more packs than the read-ahead keeps. Packs that reads were
announced for, or that consecutive batches read on in, must not be dropped before those
reads come (issue #17: an S3 restore fetched four packs twice, 608 MB for 498 MB)."""

from __future__ import annotations

import os
import random
import threading
from collections import Counter
from pathlib import Path

from deltavault.backends.base import Forwarding
from deltavault.backends.readahead import ReadAheadBackend
from deltavault.backup.files.options import FileBackupOptions
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.model.types import BlobType
from deltavault.repository.pack import pack_name
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from deltavault.testing.memory import MemoryBackend
from tests.conftest import FAST_SCRYPT, PASSWORD
from tests.treeutil import manifest

MiB = 1024 * 1024


class _Recording(Forwarding):
    """Every read of a pack that reaches the store: (name, offset, bytes returned)."""

    def __init__(self, inner: MemoryBackend) -> None:
        super().__init__(inner)
        self.reads: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(name, offset, length)
        with self._lock:
            self.reads.append((name, offset, len(data)))
        return data


def test_a_restore_fetches_each_pack_once_when_its_packs_exceed_the_budget(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "big").write_bytes(os.urandom(40 * MiB))
    store = MemoryBackend()
    repo = Repository.init(store, PASSWORD, pack_size=4 * MiB, scrypt=FAST_SCRYPT, cache_root=tmp_path / "cache")
    run_backup(repo, BackupRequest(paths=[str(src)], options=FileBackupOptions(racy_window_ns=0)))
    # A second backup: the small files in packs of their own, 7 packs of 4 MiB, each read
    # by 2 or 3 consecutive batches of 256 files (~1.6 packs a batch). Restored large
    # first: the large file's segments (10 packs) and the small files' batches read their
    # packs at once, against a read-ahead that keeps 3.
    (src / "b").mkdir()
    rnd = random.Random(17)
    for i in range(1800):
        (src / "b" / f"s{i:04}").write_bytes(rnd.randbytes(14_000 + rnd.randrange(4000)))
    run_backup(repo, BackupRequest(paths=[str(src)], options=FileBackupOptions(racy_window_ns=0)))
    packs = {name: len(data) for name, data in store.objects.items() if name.startswith("data/")}
    assert len(packs) >= 15, len(packs)

    recorded = _Recording(store)
    again = Repository.open(ReadAheadBackend(recorded, block=8 * MiB, keep=12 * MiB), lambda: PASSWORD,
                            use_cache=False)
    tree = max((snap for _sid, snap in again.list_snapshots()), key=lambda snap: snap.time).tree
    assert tree is not None
    r = FileRestorer(again, tmp_path / "out", RestoreOptions())
    r.run(tree)
    assert not r.problems
    assert manifest(tmp_path / "out" / "src") == manifest(src)

    whole = Counter(name for name, offset, n in recorded.reads if name in packs and offset == 0 and n == packs[name])
    assert set(whole) == set(packs)  # every pack read whole, as a read-ahead does
    twice = {name[-8:]: n for name, n in whole.items() if n > 1}
    assert not twice, f"packs fetched whole more than once: {twice} of {len(packs)}"
    received = sum(n for name, _o, n in recorded.reads if name in packs)
    assert received < sum(packs.values()) + MiB, (received, sum(packs.values()))


def test_a_restore_keeps_its_tree_pack_while_held_packs_fill_the_budget(tmp_path: Path) -> None:
    """The walk reads the tree pack a directory at a time all run long, unheld; a restore's
    held packs filled the budget and dropped it, and the walk waited for it again (issue
    #17: an S3 restore fetched its 4.5 MB tree pack two or three times)."""
    src = tmp_path / "src"
    rnd = random.Random(5)
    for d in range(120):
        (src / f"d{d:03}").mkdir(parents=True)
        (src / f"d{d:03}" / "f").write_bytes(rnd.randbytes(300_000 + rnd.randrange(100_000)))
    store = MemoryBackend()
    repo = Repository.init(store, PASSWORD, pack_size=4 * MiB, scrypt=FAST_SCRYPT, cache_root=tmp_path / "cache")
    run_backup(repo, BackupRequest(paths=[str(src)], options=FileBackupOptions(racy_window_ns=0)))
    recorded = _Recording(store)
    again = Repository.open(ReadAheadBackend(recorded, block=8 * MiB, keep=10 * MiB), lambda: PASSWORD,
                            use_cache=False)
    snap = next(snap for _sid, snap in again.list_snapshots())
    assert snap.tree is not None
    trees = {pack_name(pid) for pid, entries in again.indexes.index.entries_by_pack().items()
             if any(e.type == BlobType.TREE for e in entries)}
    r = FileRestorer(again, tmp_path / "out", RestoreOptions())
    r.run(snap.tree)
    assert not r.problems
    assert manifest(tmp_path / "out" / "src") == manifest(src)
    fetched = Counter(name for name, _o, _n in recorded.reads if name in trees)
    assert fetched and all(n == 1 for n in fetched.values()), fetched
