"""The repository: one object over one Backend that the engines and commands use.

A façade over focused parts, each with one job: the config and keys (config.py), the
local object cache (cache.py), the index files and packs on the backend (indexstore.py),
blob writes and reads (blobs.py), snapshots (snapshots.py) and locks (locks.py).

Write order gives crash safety: packs, then the index naming them, then the snapshot
naming the trees. A crash leaves at worst packs no index names; the next writer adopts
them by reading their headers (``adopt_orphan_packs``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import blake3

from deltavault.backends.base import Backend
from deltavault.backends.counting import CountingBackend, Traffic
from deltavault.errors import RepositoryLocked
from deltavault.fs.files import open_cache
from deltavault.model.snapshot import Snapshot
from deltavault.model.status import StatusRecord
from deltavault.model.types import BlobType
from deltavault.repository import config as configmod
from deltavault.repository import keys as keymod
from deltavault.repository import packcheck
from deltavault.repository.blobs import BlobReader, BlobWriter
from deltavault.repository.cache import ObjectCache, default_cache_root
from deltavault.repository.config import (
    DEFAULT_COMPRESSION,
    DEFAULT_PACK_SIZE,
    ChunkerParams,
    PasswordSource,
    RepoConfig,
)
from deltavault.repository.envelope import Envelope
from deltavault.repository.index import Index
from deltavault.repository.indexcache import IndexCopy
from deltavault.repository.indexstore import IndexStore, PackList, WriteStats
from deltavault.repository.keyhint import KeyHint
from deltavault.repository.locks import Lock, LockManager
from deltavault.repository.pack import PackEntry
from deltavault.repository.packcheck import PackCheck
from deltavault.repository.snapshots import SnapshotStore
from deltavault.repository.status import StatusStore


class Repository:
    """Open with :meth:`open` or create with :meth:`init`."""

    def __init__(self, backend: Backend, config: RepoConfig, master: keymod.MasterKey | None,
                 *, cache_root: Path | None = None, use_cache: bool = True) -> None:
        self.counter = backend if isinstance(backend, CountingBackend) else CountingBackend(backend)
        self.backend: Backend = self.counter
        self.config = config
        self.master = master
        self.env = Envelope(master, level=config.compression if isinstance(config.compression, int) else None)
        # The per-repository cache directory, checked to be this user's alone; None when not
        # used, with (the directory, why) in cache_note when it was refused or unusable.
        self.cache_dir: Path | None = None
        self.cache_note: tuple[str, str] | None = None
        if use_cache:
            self.cache_dir, self.cache_note = open_cache(cache_root or default_cache_root(), config.id)
        self.cache = ObjectCache(self.backend, self.cache_dir)
        self.write_stats = WriteStats()
        copy = IndexCopy(self.cache_dir, config.id, self.cache_key("index")) if self.cache_dir else None
        self.indexes = IndexStore(self.backend, self.env, self.cache, self.write_stats, copy)
        self.writer = BlobWriter(self.backend, self.env, self.indexes, config.pack_size)
        self.reader = BlobReader(self.backend, self.env, self.indexes)
        self.snapshots = SnapshotStore(self.backend, self.env, self.cache, self.write_stats)
        self.locks = LockManager(self.backend, self.env)
        self.status = StatusStore(self.backend, self.env)
        self.held_locks: list[Lock] = []
        self.key_name: str | None = None  # the key file that opened it (keys/...), if encrypted

    # ----------------------------------------------------------------- creation / opening
    @classmethod
    def init(cls, backend: Backend, password: bytes | None, *, pack_size: int = DEFAULT_PACK_SIZE,
             compression: int | str = DEFAULT_COMPRESSION, chunker: ChunkerParams | None = None,
             scrypt: tuple[int, int, int] = keymod.DEFAULT_SCRYPT, cache_root: Path | None = None,
             retention: str = "", use_cache: bool = True) -> Repository:
        cfg, master, key_name = configmod.create(backend, password, pack_size=pack_size, compression=compression,
                                                 chunker=chunker, scrypt=scrypt, retention=retention)
        repo = cls(backend, cfg, master, cache_root=cache_root, use_cache=use_cache)
        repo.key_name = key_name
        return repo

    @classmethod
    def open(cls, backend: Backend, password: PasswordSource, *, cache_root: Path | None = None,
             use_cache: bool = True, tolerant: bool = False, unencrypted: bool = False) -> Repository:
        """``tolerant``: damaged index files are recorded in ``index_errors`` instead of
        failing the open (check and repair need a repository they can still read).
        ``unencrypted``: an unencrypted repository is meant; without it one is refused
        (config.open_existing)."""
        counting = CountingBackend(backend)
        hint = KeyHint(cache_root or default_cache_root(), backend.location()) if use_cache else None
        cfg, master, key_name = configmod.open_existing(counting, password, unencrypted=unencrypted, hint=hint)
        repo = cls(counting, cfg, master, cache_root=cache_root, use_cache=use_cache)
        repo.key_name = key_name
        repo.indexes.open(tolerant=tolerant)
        return repo

    @property
    def traffic(self) -> Traffic:
        return self.counter.traffic

    def cache_key(self, purpose: str) -> bytes | None:
        """A key for authenticating one kind of local cache data (``purpose``: "catalog",
        "volume state"), derived from the master key; None for an unencrypted repository,
        which has no secret to authenticate with: its cache is protected only by being
        private to the user (fs.files)."""
        if self.master is None:
            return None
        return blake3.blake3(self.master.mac, derive_key_context=f"deltavault local cache {purpose} v1").digest()

    # ----------------------------------------------------------------- index (indexstore.py)
    @property
    def index(self) -> Index:
        return self.indexes.index

    @property
    def index_errors(self) -> list[tuple[str, str]]:
        return self.indexes.errors

    def live_index_files(self) -> set[str]:
        return self.indexes.live_files()

    def index_names(self) -> list[str]:
        return self.indexes.names()

    def save_index_copy(self) -> bool:
        """Rewrite the local copy of the index after a run that wrote index files, so the
        next open uses it as it is (IndexStore.save_copy); call it once nothing writes."""
        return self.indexes.save_copy()

    def load_index(self, *, tolerant: bool = False) -> None:
        self.indexes.load(tolerant=tolerant)

    def refresh_index(self, *, force: bool = False) -> bool:
        return self.indexes.refresh(force=force)

    def write_index_file(self, packs: PackList, supersedes: Iterable[str] = ()) -> str:
        return self.indexes.write_file(packs, supersedes)

    def list_pack_names(self) -> dict[bytes, int]:
        return packcheck.list_pack_names(self.indexes)

    def read_pack_header(self, pack_id: bytes, size: int | None = None, guess: int = 64 * 1024) -> list[PackEntry]:
        return packcheck.read_pack_header(self.indexes, pack_id, size, guess)

    def adopt_orphan_packs(self) -> int:
        return packcheck.adopt_orphan_packs(self.indexes)

    def check_packs(self) -> PackCheck:
        """What a run that writes does first: one listing of the packs; orphans adopted,
        blobs of missing or truncated packs treated as absent (repository/packcheck.py)."""
        return packcheck.check_packs(self.indexes)

    # ----------------------------------------------------------------- blobs (blobs.py)
    def has_blob(self, blob_id: bytes) -> bool:
        return blob_id in self.indexes.index

    def blob_id(self, data: bytes | memoryview) -> bytes:
        return self.env.blob_id(data)

    def blob_size(self, blob_id: bytes) -> int | None:
        """The blob's plaintext length as the index records it; None if not indexed."""
        return self.indexes.index.plain_size(blob_id)

    def save_blob(self, btype: BlobType, data: bytes | memoryview, *, blob_id: bytes | None = None,
                  level: int | None = None, compress: bool = True) -> tuple[bytes, int]:
        """Store a blob unless present. Returns (id, sealed bytes added). Thread-safe."""
        return self.writer.save(btype, data, blob_id=blob_id, level=level, compress=compress)

    def save_blobs(self, btype: BlobType, items: Sequence[bytes | memoryview], *, level: int | None = None,
                   compress: bool = True) -> list[tuple[bytes, int]]:
        """``save_blob`` of each item, sealed and packed together (blobs.BlobWriter.save_many)."""
        return self.writer.save_many(btype, items, level=level, compress=compress)

    def flush(self) -> None:
        """Upload partly filled packs and write the index for everything written."""
        self.writer.flush()

    def load_blob(self, blob_id: bytes) -> bytes:
        return self.reader.load(blob_id)

    def open_blob(self, blob_id: bytes, sealed: bytes | memoryview) -> bytes:
        return self.reader.open(blob_id, sealed)

    def load_blobs(self, ids: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
        return self.reader.load_many(ids)

    def hold_blobs(self, ids: Iterable[bytes], *, wait: bool = False) -> Callable[[], None]:
        return self.reader.hold(ids, wait=wait)

    # ----------------------------------------------------------------- snapshots (snapshots.py)
    @property
    def damaged_snapshots(self) -> dict[str, str]:
        return self.snapshots.damaged

    def save_snapshot(self, snap: Snapshot) -> str:
        self.check_locks()
        return self.snapshots.save(snap)

    def snapshot_ids(self) -> list[str]:
        return self.snapshots.ids()

    def load_snapshot(self, sid: str) -> Snapshot:
        return self.snapshots.load(sid)

    def list_snapshots(self) -> list[tuple[str, Snapshot]]:
        return self.snapshots.list()

    def delete_snapshot(self, sid: str) -> None:
        self.snapshots.delete(sid)

    def resolve_snapshot(self, ref: str, *, source_id: str | None = None,
                         kind: str | None = None) -> tuple[str, Snapshot]:
        return self.snapshots.resolve(ref, source_id=source_id, kind=kind)

    # ----------------------------------------------------------------- status (status.py)
    def save_status(self, rec: StatusRecord) -> str | None:
        """Record a check result or a failed run; best effort: why it was not saved, or None."""
        return self.status.save(rec)

    def status_records(self, kind: str, *, newest: int | None = None, since_ns: int = 0) -> list[StatusRecord]:
        return self.status.records(kind, newest=newest, since_ns=since_ns)

    # ----------------------------------------------------------------- locking (locks.py)
    def lock(self, *, exclusive: bool = False, command: str = "", wait: float = 0.0) -> Lock:
        """Take a lock, then refresh the index: while this process waited, a prune may
        have removed packs that the index it loaded at open still names."""
        lk = self.locks.acquire(exclusive=exclusive, command=command, wait=wait)
        try:
            self.refresh_index()
        except BaseException:
            lk.release()
            raise
        self.held_locks = [x for x in self.held_locks if not x.released] + [lk]
        return lk

    def check_locks(self) -> None:
        """Raise if a lock this process holds was removed by a peer as stale."""
        for lk in self.held_locks:
            if not lk.released and not lk.still_held():
                raise RepositoryLocked(
                    f"the repository lock ({lk.info.command or 'lock'}) was removed by another process "
                    "that judged it stale; stopping before writing a snapshot. Nothing stored is "
                    "damaged; run the command again")


__all__ = ["Repository"]
