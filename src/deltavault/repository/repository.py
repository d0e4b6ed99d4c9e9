"""The repository: config, keys, packs, index, snapshots, locks over one Backend.

Write order gives crash safety: packs, then the index naming them, then the snapshot
naming the trees. A crash leaves at worst packs no index names; the next writer adopts
them by reading their headers (see ``adopt_orphan_packs``).
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import msgspec

from deltavault.backends import retention as retention_mod
from deltavault.backends.base import Backend
from deltavault.backends.counting import CountingBackend, Traffic
from deltavault.errors import (
    BackendError,
    CorruptionError,
    FormatError,
    ObjectNotFound,
    RepositoryExists,
    RepositoryLocked,
    RepositoryNotFound,
    UnsupportedVersion,
    UsageError,
)
from deltavault.fs.files import (
    open_cache,
    read_cache_file,
    remove_cache_file,
    remove_cache_files,
    write_cache_file,
)
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import ID_LEN, BlobType, match_prefix
from deltavault.repository import keys as keymod
from deltavault.repository.envelope import Envelope
from deltavault.repository.index import (
    INDEX_AAD,
    Index,
    IndexFile,
    IndexPack,
    decode_index,
    decode_index_head,
    encode_index,
)
from deltavault.repository.locks import Lock, LockManager
from deltavault.repository.pack import (
    BLOB_AAD,
    MAGIC,
    PackBuilder,
    PackEntry,
    pack_name,
    parse_header,
    parse_tail,
    tail_size,
)

REPO_VERSION = 1
SNAPSHOT_AAD = b"snapshot"
DEFAULT_PACK_SIZE = 32 * 1024 * 1024
DEFAULT_COMPRESSION = "auto"
# How many freshly written packs may wait before an index file names them.
INDEX_EVERY_PACKS = 32


class ChunkerParams(msgspec.Struct, kw_only=True):
    # FastCDC: mean chunk about min + avg (320 KiB)
    min: int = 64 * 1024
    avg: int = 256 * 1024
    max: int = 2 * 1024 * 1024


class RepoConfig(msgspec.Struct, kw_only=True):
    format: str = "deltavault"
    v: int = REPO_VERSION
    id: str
    encryption: str  # "aes-256-gcm+scrypt" | "none"
    chunker: ChunkerParams = msgspec.field(default_factory=ChunkerParams)
    pack_size: int = DEFAULT_PACK_SIZE
    compression: int | str = DEFAULT_COMPRESSION  # "auto" or a zstd level
    # Keyed BLAKE3 of the fields above under the master key (empty when unencrypted),
    # so an edited config is noticed.
    mac: str = ""
    # S3 Object Lock on everything written: "governance:DAYS" or "compliance:DAYS", "" for
    # none (backends/retention.py). Authenticated by ``mac`` too.
    retention: str = ""


def config_mac(cfg: RepoConfig, master: keymod.MasterKey) -> str:
    """Keyed BLAKE3 of the config's JSON with ``mac`` empty, under the master key's MAC half.
    An empty ``retention`` is left out, so configs from before it existed still match."""
    fields = msgspec.structs.asdict(msgspec.structs.replace(cfg, mac=""))
    if not fields["retention"]:
        del fields["retention"]
    return blake3.blake3(msgspec.json.encode(fields), key=master.mac).hexdigest()


def default_cache_root() -> Path:
    env = os.environ.get("DELTAVAULT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "deltavault" if xdg else Path.home() / ".cache" / "deltavault"


def short_id(snap_id: str) -> str:
    return snap_id[:8]


@dataclass
class WriteStats:
    blobs_added: int = 0
    bytes_added_raw: int = 0  # plaintext bytes of new blobs
    bytes_added_stored: int = 0  # sealed bytes of new blobs in packs
    packs_written: int = 0
    index_files_written: int = 0
    bytes_written: int = 0  # everything put to the backend (packs, index, snapshot)


@dataclass
class _Pending:
    builders: dict[str, PackBuilder] = field(default_factory=dict)
    unindexed: list[tuple[bytes, list[PackEntry]]] = field(default_factory=list)


PasswordSource = Callable[[], bytes]


class Repository:
    """Open with :meth:`open` or create with :meth:`init`."""

    def __init__(self, backend: Backend, config: RepoConfig, master: keymod.MasterKey | None,
                 *, cache_root: Path | None = None, use_cache: bool = True) -> None:
        self.counter = backend if isinstance(backend, CountingBackend) else CountingBackend(backend)
        self.backend: Backend = self.counter
        self.config = config
        self.master = master
        self.env = Envelope(master, level=config.compression if isinstance(config.compression, int) else None)
        self.index = Index()
        # The per-repository cache directory, checked to be this user's alone; None when not
        # used, with (the directory, why) in cache_note when it was refused or unusable.
        self.cache_dir: Path | None = None
        self.cache_note: tuple[str, str] | None = None
        if use_cache:
            self.cache_dir, self.cache_note = open_cache(cache_root or default_cache_root(), config.id)
        self.write_stats = WriteStats()
        self._lock = threading.Lock()
        self._pack_lock = threading.Lock()
        self._pending_ids: set[bytes] = set()
        self._pending = _Pending()
        self._loaded_index_files: set[str] = set()
        self._superseded_index_files: set[str] = set()
        self.held_locks: list[Lock] = []
        self.index_errors: list[tuple[str, str]] = []  # (name, message) in tolerant mode
        self._uploader: threading.Thread | None = None
        self._uploads: queue.Queue[PackBuilder | None] = queue.Queue(maxsize=2)
        self._upload_error: BaseException | None = None
        self.locks = LockManager(self.backend, self.env)
        self.key_name: str | None = None  # the key file that opened it (keys/...), if encrypted
        self.damaged_snapshots: dict[str, str] = {}  # snapshot id -> why list_snapshots left it out

    # ----------------------------------------------------------------- creation / opening
    @classmethod
    def init(cls, backend: Backend, password: bytes | None, *, pack_size: int = DEFAULT_PACK_SIZE,
             compression: int | str = DEFAULT_COMPRESSION, chunker: ChunkerParams | None = None,
             scrypt: tuple[int, int, int] = keymod.DEFAULT_SCRYPT, cache_root: Path | None = None,
             retention: str = "") -> Repository:
        try:
            backend.stat("config")
            raise RepositoryExists(f"a repository already exists at {backend.location()}")
        except ObjectNotFound:
            pass
        retention_mod.apply(backend, retention, creating=True)  # refused before anything is written
        if not 1024 * 1024 <= pack_size <= 1024**3:
            raise UsageError("pack size must be between 1 MiB and 1 GiB")
        if compression != "auto" and not (isinstance(compression, int) and -7 <= compression <= 22):
            raise UsageError("compression must be 'auto' or a zstd level from -7 to 22")
        master = keymod.MasterKey.generate() if password is not None else None
        cfg = RepoConfig(id=os.urandom(16).hex(),
                         encryption="aes-256-gcm+scrypt" if master else "none",
                         chunker=chunker or ChunkerParams(), pack_size=pack_size, compression=compression,
                         retention=retention)
        if master:
            cfg.mac = config_mac(cfg, master)
            kf = keymod.make_key_file(master, password or b"", scrypt)
            key_name = keymod.key_file_name(kf)
            backend.put(key_name, kf)
        # config last: a repository without it does not exist yet
        backend.put("config", msgspec.json.encode(cfg))
        repo = cls(backend, cfg, master, cache_root=cache_root)
        repo.key_name = key_name if master else None
        return repo

    @classmethod
    def open(cls, backend: Backend, password: PasswordSource, *, cache_root: Path | None = None,
             use_cache: bool = True, tolerant: bool = False) -> Repository:
        """``tolerant``: damaged index files are recorded in ``index_errors`` instead of
        failing the open (check and repair need a repository they can still read)."""
        counting = CountingBackend(backend)
        try:
            raw = counting.get("config")
        except ObjectNotFound:
            if any(True for _ in counting.list("keys/")) or any(True for _ in counting.list("index/")):
                raise CorruptionError(f"the repository at {backend.location()} has lost its config; "
                                      "'deltavault repair' rebuilds it") from None
            raise RepositoryNotFound(f"no repository at {backend.location()} (run 'deltavault init')") from None
        try:
            cfg = msgspec.json.decode(raw, type=RepoConfig)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise FormatError(f"repository config is damaged: {exc}; 'deltavault repair' rebuilds it") from exc
        if cfg.format != "deltavault":
            raise FormatError("not a deltavault repository")
        if cfg.compression != "auto" and not isinstance(cfg.compression, int):
            raise FormatError(f"repository config: unknown compression {cfg.compression!r}")
        if cfg.v != REPO_VERSION:
            raise UnsupportedVersion(f"repository format {cfg.v}; this build reads {REPO_VERSION}")
        key_names = [o.name for o in counting.list("keys/")]
        master: keymod.MasterKey | None = None
        key_name: str | None = None
        if key_names or cfg.encryption != "none":
            if not key_names:
                raise CorruptionError("repository is encrypted but has no key files")
            master, key_name = cls.unlock(counting, key_names, password())
            if cfg.mac != config_mac(cfg, master):
                raise CorruptionError("repository config fails its authentication: it was edited or damaged; "
                                      "'deltavault repair' rebuilds it")
        retention_mod.apply(counting, cfg.retention, creating=False)
        repo = cls(counting, cfg, master, cache_root=cache_root, use_cache=use_cache)
        repo.key_name = key_name
        repo.load_index(tolerant=tolerant)
        return repo

    @staticmethod
    def unlock(backend: Backend, key_names: list[str], password: bytes) -> tuple[keymod.MasterKey, str]:
        from deltavault.errors import KeyFileDamaged, WrongPassword

        damaged: KeyFileDamaged | None = None
        for name in sorted(key_names):
            try:
                kf = keymod.parse_key_file(backend.get(name), name)
                return keymod.unwrap(kf, password), name
            except KeyFileDamaged as exc:
                damaged = exc
            except WrongPassword:
                continue
        if damaged is not None and len(key_names) == 1:
            raise damaged
        raise WrongPassword("wrong password: no key file of this repository opens with it")

    @property
    def traffic(self) -> Traffic:
        return self.counter.traffic

    # ----------------------------------------------------------------- cache
    # Cached objects are content-addressed (checked against their name on every read), the
    # directories private (fs.files): another user can neither plant nor read them.
    def cache_key(self, purpose: str) -> bytes | None:
        """A key for authenticating one kind of local cache data (``purpose``: "catalog",
        "volume state"), derived from the master key; None for an unencrypted repository,
        which has no secret to authenticate with: its cache is protected only by being
        private to the user (fs.files)."""
        if self.master is None:
            return None
        return blake3.blake3(self.master.mac, derive_key_context=f"deltavault local cache {purpose} v1").digest()

    def _cache_path(self, name: str) -> Path | None:
        folder, _, leaf = name.rpartition("/")
        if self.cache_dir is None or not leaf or leaf in (".", "..") or "\0" in leaf:
            return None  # names come from the repository's listing: never a path of their own
        return self.cache_dir / folder / leaf if folder else self.cache_dir / leaf

    def _cache_get(self, name: str) -> bytes | None:
        path = self._cache_path(name)
        if path is None:
            return None
        data = read_cache_file(path)
        if data is None:
            return None
        if blake3.blake3(data).hexdigest() != name.rsplit("/", 1)[-1]:
            remove_cache_file(path)
            return None
        return data

    def _cache_put(self, name: str, data: bytes) -> None:
        path = self._cache_path(name)
        if path is not None:
            write_cache_file(path, data)

    def _cache_prune(self, folder: str, keep: set[str]) -> None:
        if self.cache_dir is None:
            return
        remove_cache_files(self.cache_dir / folder, lambda leaf: f"{folder}/{leaf}" not in keep)

    def _get_immutable(self, name: str) -> bytes:
        """Fetch a content-addressed object (index/, snapshots/) via the local cache."""
        data = self._cache_get(name)
        if data is None:
            data = self.backend.get(name)
            if blake3.blake3(data).hexdigest() != name.rsplit("/", 1)[-1]:
                raise CorruptionError(f"{name}: content does not match its name (damaged)")
            self._cache_put(name, data)
        return data

    # ----------------------------------------------------------------- index
    def live_index_files(self) -> set[str]:
        """Index files in force: loaded and not superseded. Blobs are removed only by
        writing an index that supersedes these, so an unchanged set means no blob is gone."""
        return set(self._loaded_index_files) - self._superseded_index_files

    def index_names(self) -> list[str]:
        return sorted(o.name for o in self.backend.list("index/"))

    def read_index_file(self, name: str) -> IndexFile:
        sealed = self._get_immutable(name)
        return decode_index(self.env.open(sealed, aad=INDEX_AAD, what=name), name)

    def load_index(self, *, tolerant: bool = False) -> None:
        # Two passes: first only what each file supersedes, then each file decoded and added
        # on its own, so a large index never sits in memory as objects all at once.
        names = self.index_names()
        heads: dict[str, tuple[list[bytes], bytes | None]] = {}
        for name in names:
            if name in self._loaded_index_files or name in self._superseded_index_files:
                continue
            try:
                raw = self.env.open(self._get_immutable(name), aad=INDEX_AAD, what=name)
                heads[name] = (decode_index_head(raw, name), raw if len(raw) < 8 << 20 else None)
            except (CorruptionError, UnsupportedVersion) as exc:
                if not tolerant:
                    raise
                if name not in {n for n, _m in self.index_errors}:  # a reload meets it again
                    self.index_errors.append((name, str(exc)))
        superseded = {f"index/{s.hex()}" for sup, _raw in heads.values() for s in sup}
        self._superseded_index_files |= superseded
        for name, (_sup, kept) in heads.items():
            if name in superseded:
                continue
            try:
                f = decode_index(kept, name) if kept is not None else self.read_index_file(name)
            except (CorruptionError, UnsupportedVersion) as exc:
                if not tolerant:
                    raise
                self.index_errors.append((name, str(exc)))
                continue
            for p in f.packs:
                self.index.add_pack(p.id, p.blobs)
            del f
            self._loaded_index_files.add(name)
        self._cache_prune("index", set(names))

    def refresh_index(self, *, force: bool = False) -> bool:
        """Bring the in-memory index up to date (called once a lock is held): load new index
        files, and rebuild from scratch when a file loaded earlier was removed or superseded,
        since a prune or repair compacted the index and packs it named may be gone.
        ``force`` always rebuilds. Returns True when it rebuilt."""
        names = set(self.index_names())
        rebuild = force or bool(self._loaded_index_files - names)
        for name in sorted(names - self._loaded_index_files - self._superseded_index_files):
            if rebuild:
                break
            try:
                f = self.read_index_file(name)
            except (CorruptionError, UnsupportedVersion):
                continue  # load_index reports it
            rebuild = any(f"index/{s.hex()}" in self._loaded_index_files for s in f.supersedes)
        if rebuild:
            with self._lock:
                self.index = Index()
                self._loaded_index_files = set()
                self._superseded_index_files = set()
                for pid, entries in self._pending.unindexed:
                    self.index.add_pack(pid, entries)
        self.load_index(tolerant=bool(self.index_errors))
        return rebuild

    def check_locks(self) -> None:
        """Raise if a lock this process holds was removed by a peer as stale."""
        for lk in self.held_locks:
            if not lk.released and not lk.still_held():
                raise RepositoryLocked(
                    f"the repository lock ({lk.info.command or 'lock'}) was removed by another process "
                    "that judged it stale; stopping before writing a snapshot. Nothing stored is "
                    "damaged; run the command again")

    def write_index_file(self, packs: list[tuple[bytes, list[PackEntry]]],
                         supersedes: Iterable[str] = ()) -> str:
        body = IndexFile(packs=[IndexPack(pid, entries) for pid, entries in packs],
                         supersedes=[bytes.fromhex(s.rsplit("/", 1)[-1]) for s in supersedes])
        sealed = self.env.seal(encode_index(body), aad=INDEX_AAD)
        name = f"index/{blake3.blake3(sealed).hexdigest()}"
        self.backend.put(name, sealed)
        self._cache_put(name, sealed)
        self._loaded_index_files.add(name)
        with self._lock:
            self.write_stats.index_files_written += 1
            self.write_stats.bytes_written += len(sealed)
        return name

    def list_pack_names(self) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        for o in self.backend.list("data/"):
            h = o.name.rsplit("/", 1)[-1]
            try:
                pid = bytes.fromhex(h)
            except ValueError:
                continue
            if len(pid) == ID_LEN:
                out[pid] = o.size
        return out

    def read_pack_header(self, pack_id: bytes, size: int | None = None) -> list[PackEntry]:
        name = pack_name(pack_id)
        if size is None:
            size = self.backend.stat(name).size
        if size < len(MAGIC) + tail_size():
            raise FormatError(f"pack {name}: truncated ({size} bytes)")
        # One ranged read usually covers trailer and header.
        guess = min(size, 64 * 1024)
        tail = self.backend.get(name, size - guess, guess)
        hlen = parse_tail(tail, size, name)
        need = hlen + tail_size()
        if need > len(tail):
            tail = self.backend.get(name, size - need, need)
        sealed = tail[len(tail) - need: len(tail) - tail_size()]
        return parse_header(self.env, sealed, size, name)

    def adopt_orphan_packs(self) -> int:
        """Index packs that a crashed or concurrent writer uploaded but did not index.
        Only their headers are read. Returns the number adopted."""
        adopted: list[tuple[bytes, list[PackEntry]]] = []
        for pid, size in self.list_pack_names().items():
            if self.index.has_pack(pid):
                continue
            try:
                entries = self.read_pack_header(pid, size)
            except (CorruptionError, ObjectNotFound):
                continue  # damaged or vanished: left to check/repair
            self.index.add_pack(pid, entries)
            adopted.append((pid, entries))
        if adopted:
            self.write_index_file(adopted)
        return len(adopted)

    # ----------------------------------------------------------------- blobs
    def has_blob(self, blob_id: bytes) -> bool:
        return blob_id in self.index

    def blob_id(self, data: bytes | memoryview) -> bytes:
        return self.env.blob_id(data)

    def save_blob(self, btype: BlobType, data: bytes | memoryview, *, blob_id: bytes | None = None,
                  level: int | None = None, compress: bool = True) -> tuple[bytes, int]:
        """Store a blob unless present. Returns (id, sealed bytes added). Thread-safe."""
        self._raise_upload_error()
        bid = blob_id or self.env.blob_id(data)
        with self._lock:
            if bid in self.index or bid in self._pending_ids:
                return bid, 0
            self._pending_ids.add(bid)
        try:
            sealed = self.env.seal_parts(data, compress=compress, level=level, aad=BLOB_AAD)
        except BaseException:
            with self._lock:
                self._pending_ids.discard(bid)
            raise
        kind = "data" if btype == BlobType.DATA else "tree"
        full: PackBuilder | None = None
        with self._pack_lock:
            b = self._pending.builders.get(kind)
            if b is None:
                b = self._pending.builders[kind] = PackBuilder()
            stored = b.add(btype, bid, sealed, len(data))
            if len(b) >= self.config.pack_size:
                full = self._pending.builders.pop(kind)
        with self._lock:
            self.write_stats.blobs_added += 1
            self.write_stats.bytes_added_raw += len(data)
            self.write_stats.bytes_added_stored += stored
        if full is not None:
            self._queue_upload(full)
        return bid, stored

    # Packs are finished and written by one uploader thread, so workers never wait on fsync;
    # the bounded queue keeps at most a few packs in memory.
    def _queue_upload(self, builder: PackBuilder) -> None:
        if self._uploader is None:
            self._uploads = queue.Queue(maxsize=2)
            self._uploader = threading.Thread(target=self._upload_loop, name="dv-upload", daemon=True)
            self._uploader.start()
        self._uploads.put(builder)
        self._raise_upload_error()

    def _upload_loop(self) -> None:
        while True:
            builder = self._uploads.get()
            try:
                if builder is None:
                    return
                if self._upload_error is None:
                    self._upload(builder)
            except BaseException as exc:
                self._upload_error = exc
            finally:
                self._uploads.task_done()

    def _raise_upload_error(self) -> None:
        if self._upload_error is not None:
            raise self._upload_error

    def _upload(self, builder: PackBuilder) -> None:
        pid, data, entries = builder.finish(self.env)
        self.backend.put(pack_name(pid), data)
        write_index: list[tuple[bytes, list[PackEntry]]] | None = None
        with self._lock:
            self.index.add_pack(pid, entries)
            for e in entries:
                self._pending_ids.discard(e.id)
            self.write_stats.packs_written += 1
            self.write_stats.bytes_written += len(data)
            self._pending.unindexed.append((pid, entries))
            if len(self._pending.unindexed) >= INDEX_EVERY_PACKS:
                write_index, self._pending.unindexed = self._pending.unindexed, []
        if write_index:
            self.write_index_file(write_index)

    def flush(self) -> None:
        """Upload partly filled packs and write the index for everything written."""
        with self._pack_lock:
            builders = list(self._pending.builders.values())
            self._pending.builders.clear()
        if self._uploader is not None:
            # Drain and stop the uploader: the next full pack starts a new one, so no idle
            # thread outlives a run.
            self._uploads.put(None)
            self._uploader.join()
            self._uploader = None
            self._raise_upload_error()
        for b in builders:
            if b.entries:
                self._upload(b)
        with self._lock:
            todo, self._pending.unindexed = self._pending.unindexed, []
        if todo:
            self.write_index_file(todo)

    def load_blob(self, blob_id: bytes) -> bytes:
        loc = self.index.lookup(blob_id)
        if loc is None:
            raise CorruptionError(f"blob {blob_id.hex()[:16]} is missing from the index")
        sealed = self.backend.get(pack_name(loc.pack_id), loc.offset, loc.length)
        if len(sealed) != loc.length:
            raise CorruptionError(f"blob {blob_id.hex()[:16]}: pack {loc.pack_id.hex()[:16]} is truncated")
        return self.open_blob(blob_id, sealed)

    def open_blob(self, blob_id: bytes, sealed: bytes | memoryview) -> bytes:
        """Unseal a blob read from a pack and check it against its id."""
        data = self.env.open(sealed, aad=BLOB_AAD, what=f"blob {blob_id.hex()[:16]}")
        if self.env.blob_id(data) != blob_id:
            raise CorruptionError(f"blob {blob_id.hex()[:16]}: content does not match its id")
        return data

    def load_blobs(self, ids: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """Load many blobs, reading neighbouring blobs of one pack in a single request."""
        by_pack: dict[bytes, list[tuple[int, int, bytes]]] = {}
        for bid in dict.fromkeys(ids):
            loc = self.index.lookup(bid)
            if loc is None:
                raise CorruptionError(f"blob {bid.hex()[:16]} is missing from the index")
            by_pack.setdefault(loc.pack_id, []).append((loc.offset, loc.length, bid))
        for pid, items in by_pack.items():
            items.sort()
            i = 0
            while i < len(items):
                start = items[i][0]
                j = i
                end = items[i][0] + items[i][1]
                while j + 1 < len(items) and items[j + 1][0] - end < 256 * 1024 and items[j + 1][0] + items[j + 1][1] - start < 64 * 1024 * 1024:
                    j += 1
                    end = max(end, items[j][0] + items[j][1])
                buf = self.backend.get(pack_name(pid), start, end - start)
                if len(buf) != end - start:
                    raise CorruptionError(f"pack {pid.hex()[:16]} is truncated")
                mv = memoryview(buf)
                for off, ln, bid in items[i:j + 1]:
                    yield bid, self.open_blob(bid, mv[off - start: off - start + ln])
                i = j + 1

    # ----------------------------------------------------------------- snapshots
    def save_snapshot(self, snap: Snapshot) -> str:
        self.check_locks()
        sealed = self.env.seal(msgspec.msgpack.encode(snap), aad=SNAPSHOT_AAD)
        sid = blake3.blake3(sealed).hexdigest()
        name = f"snapshots/{sid}"
        self.backend.put(name, sealed)
        self._cache_put(name, sealed)
        with self._lock:
            self.write_stats.bytes_written += len(sealed)
        return sid

    def snapshot_ids(self) -> list[str]:
        return [o.name.rsplit("/", 1)[-1] for o in self.backend.list("snapshots/")]

    def load_snapshot(self, sid: str) -> Snapshot:
        name = f"snapshots/{sid}"
        raw = self.env.open(self._get_immutable(name), aad=SNAPSHOT_AAD, what=f"snapshot {short_id(sid)}")
        try:
            snap = msgspec.msgpack.decode(raw, type=Snapshot)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise FormatError(f"snapshot {short_id(sid)} does not parse: {exc}") from exc
        if snap.tree is not None and len(snap.tree) != ID_LEN:
            raise FormatError(f"snapshot {short_id(sid)}: bad tree id")
        return snap

    def list_snapshots(self) -> list[tuple[str, Snapshot]]:
        """Every readable snapshot, oldest first. One that cannot be read (damaged, tampered
        with) is left out and named in ``damaged_snapshots``: it must not stop a backup or a
        restore of another snapshot. Commands that delete data (prune) load each snapshot
        themselves and refuse instead."""
        ids = self.snapshot_ids()
        out = []
        for sid in ids:
            try:
                out.append((sid, self.load_snapshot(sid)))
            except ObjectNotFound:
                continue  # forgotten by another process since it was listed
            except CorruptionError as exc:
                self.damaged_snapshots[sid] = exc.message
        self._cache_prune("snapshots", {f"snapshots/{s}" for s in ids})
        out.sort(key=lambda x: (x[1].time_ns, x[0]))
        return out

    def delete_snapshot(self, sid: str) -> None:
        self.backend.delete(f"snapshots/{sid}")
        path = self._cache_path(f"snapshots/{sid}")
        if path is not None:
            remove_cache_file(path)

    def resolve_snapshot(self, ref: str, *, source_id: str | None = None,
                         kind: str | None = None) -> tuple[str, Snapshot]:
        """'latest', 'latest:PATH' (the newest snapshot of PATH), a full id, or a unique
        prefix of one. ``kind`` narrows 'latest' to files or volume snapshots."""
        if ref == "latest" or ref.startswith("latest:"):
            snaps = self.list_snapshots()
            if source_id is not None:
                snaps = [s for s in snaps if s[1].source_id == source_id]
            if kind is not None:
                snaps = [s for s in snaps if s[1].kind == kind]
            path = ref.partition(":")[2]
            if path:
                want = os.path.abspath(path)
                snaps = [s for s in snaps if want in s[1].paths]
            if not snaps:
                what = " ".join(x for x in (kind, "snapshot") if x) + (f" of {path}" if path else "")
                raise UsageError(f"the repository has no {what} yet")
            return snaps[-1]
        sid = match_prefix(self.snapshot_ids(), ref.lower(), "snapshot")
        return sid, self.load_snapshot(sid)

    # ----------------------------------------------------------------- locking
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


def hostname() -> str:
    return socket.gethostname()


__all__ = ["BackendError", "ChunkerParams", "RepoConfig", "Repository", "WriteStats", "short_id"]
