"""The repository's index files: loading them into the in-memory ``Index``, keeping it up to
date while other processes write, and writing new ones.

Index files are sealed, content-addressed (``index/<BLAKE3>``) and immutable; a file may
supersede others (prune and repair compact the index that way). Packs written by this
process wait in ``unindexed`` until an index file names them; a crash before that leaves
packs no index names, which the next writer adopts by reading their headers
(``adopt_orphan_packs``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import blake3

from deltavault.backends.base import Backend
from deltavault.backends.limits import INDEX_MAX
from deltavault.errors import CorruptionError, UnsupportedVersion
from deltavault.repository.cache import ObjectCache
from deltavault.repository.envelope import Envelope
from deltavault.repository.index import Index
from deltavault.repository.indexcache import IndexCopy
from deltavault.repository.indexfile import (
    INDEX_AAD,
    IndexFile,
    IndexPack,
    check_index,
    decode_index,
    decode_index_head,
    decode_index_pack,
    encode_index,
)
from deltavault.repository.pack import PackEntry

# How many freshly written packs may wait before an index file names them.
INDEX_EVERY_PACKS = 32
# An index file this small is kept decoded between the two passes of a load.
KEEP_DECODED_BELOW = 8 << 20

PackList = list[tuple[bytes, list[PackEntry]]]


@dataclass
class WriteStats:
    blobs_added: int = 0
    bytes_added_raw: int = 0  # plaintext bytes of new blobs
    bytes_added_stored: int = 0  # sealed bytes of new blobs in packs
    packs_written: int = 0
    index_files_written: int = 0
    bytes_written: int = 0  # everything put to the backend (packs, index, snapshot)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        """Thread-safe: the workers, the uploader and the caller all write."""
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


class IndexStore:
    """``lock`` guards ``index`` and ``unindexed``; the blob writer shares it. It is
    reentrant: the first use of ``index`` loads it under ``lock``, and the blob writer
    makes that first use while holding it.

    ``open`` loads nothing: ``index`` is built on first use (``_ensure``), so a command
    that never looks a blob up (snapshots, forget, tag) never reads an index file or the
    copy. Loading at first use rather than at open is never staler: a lock taken before
    that use is followed by the load, which lists ``index/`` then."""

    def __init__(self, backend: Backend, env: Envelope, cache: ObjectCache, stats: WriteStats,
                 copy: IndexCopy | None = None) -> None:
        self.backend = backend
        self.env = env
        self.cache = cache
        self.stats = stats
        self.copy = copy  # the local copy of the built index (indexcache.py), if a cache is used
        self.from_copy = False  # whether ``open`` took the index from that copy
        self.lock = threading.RLock()
        self._index = Index()
        self._pending = False  # opened, index not built yet (built by _ensure)
        self._building = False
        self._tolerant = False
        # The names listed under index/ that the state below stands for, and whether it is
        # exactly what loading them gives (not after writing a file that supersedes others);
        # ``save_copy`` writes the copy only then. ``_wrote``: files written since the copy was.
        self._listed: set[str] = set()
        self._faithful = True
        self._wrote = False
        self.errors: list[tuple[str, str]] = []  # (name, message) in tolerant mode
        self.max_file = INDEX_MAX  # the most bytes an index file is written with (tests set it lower)
        self.unindexed: PackList = []  # written by this process, named by no index file yet
        self._loaded: set[str] = set()
        self._superseded: set[str] = set()
        # Packs a backup found missing (check_packs), named as gone in every index file
        # this process writes, so a load prefers the copies it stores again (indexfile.py).
        self.gone: set[bytes] = set()
        self._limits: dict[bytes, int] = {}  # their sizes (0: gone), applied after every load

    @property
    def index(self) -> Index:
        if self._pending:
            self._ensure()
        return self._index

    @index.setter
    def index(self, value: Index) -> None:
        self._index = value

    def _ensure(self) -> None:
        self._build(self._open)

    def _build(self, how: Callable[[], object]) -> None:
        """Build the index with ``how`` under ``lock``; other threads' first use waits here,
        and sees ``_pending`` cleared only once it is whole."""
        with self.lock:
            if not self._pending or self._building:
                return  # built while this thread waited, or being built by this very thread
            self._building = True
            try:
                how()
            except BaseException:
                # Nothing partial is kept: the next use tries again from nothing.
                self._index, self._loaded, self._superseded, self._listed = Index(), set(), set(), set()
                self.errors = []
                raise
            finally:
                self._building = False
            self._pending = False

    def live_files(self) -> set[str]:
        """Index files in force: loaded and not superseded. Blobs are removed only by
        writing an index that supersedes these, so an unchanged set means no blob is gone."""
        if self._pending:
            self._ensure()
        return set(self._loaded) - self._superseded

    def names(self) -> list[str]:
        return sorted(o.name for o in self.backend.list("index/"))

    def read_file(self, name: str) -> IndexFile:
        return decode_index(self.env.open(self.cache.fetch(name), aad=INDEX_AAD, what=name), name)

    def open(self, *, tolerant: bool = False) -> None:
        """Mark the index to be built on first use (``_ensure``); a ``tolerant`` open (check,
        repair) builds it now, so ``errors`` is filled when the open returns."""
        self._tolerant = tolerant
        self._pending = True
        if tolerant:
            self._ensure()

    def _open(self) -> None:
        """The first load, from the local copy of the built index when it is current. The
        copy stands for exactly the state a load of its listed names left, so the names
        listed now are applied to it as ``refresh`` applies them to a loaded index: none
        new and none gone, it is used as it is; new files that supersede nothing loaded are
        added to it; a loaded file gone or superseded (a prune or repair) rebuilds from the
        index files. Then the copy is rewritten unless it was current. ``tolerant`` (check,
        repair) never uses it: they must meet every index file."""
        if self._tolerant or self.copy is None:
            self.load(tolerant=self._tolerant)
            return
        names = self.names()
        built = self.copy.read()
        if built is not None:
            self._index, self._loaded, self._superseded, listed = (built.index, built.loaded,
                                                                   built.superseded, built.listed)
            del built  # a rebuild below must not keep this index alive next to the new one
            if listed == names:
                self.from_copy = True
                self._listed = set(names)
                return
            self.refresh(names=names)
        else:
            self.load(names=names)
        if not self.errors:
            self.copy.write(self._index, names, self._loaded, self._superseded)
            self._wrote = False

    def save_copy(self) -> bool:
        """Rewrite the local copy after this process wrote index files (a backup), so the
        next open uses it as it is instead of decoding them and rewriting it then. Only
        when the index is exactly what loading the names in ``_listed`` gives: built, with
        no pack waiting for an index file, nothing superseded by this process, no damaged
        file. Call it when nothing writes blobs any more. Returns whether it wrote."""
        with self.lock:
            if (self.copy is None or self._pending or not self._wrote or not self._faithful
                    or self.unindexed or self.errors):
                return False
            written = self.copy.write(self._index, sorted(self._listed), self._loaded, self._superseded)
            self._wrote = False
            return written

    def load(self, *, tolerant: bool = False, names: list[str] | None = None) -> None:
        # Two passes: first only what each file supersedes, then each file checked and added
        # one pack at a time, so a large index never sits in memory as objects all at once.
        if self._pending and not self._building:  # a direct load (load_index) is the build
            self._build(lambda: self.load(tolerant=tolerant, names=names))
            return
        if names is None:
            names = self.names()
        self._listed = set(names)
        heads: dict[str, tuple[list[bytes], int, bytes | None, list[bytes]]] = {}
        for name in names:
            if name in self._loaded or name in self._superseded:
                continue
            try:
                raw = self.env.open(self.cache.fetch(name), aad=INDEX_AAD, what=name)
                sup, blobs, marks = decode_index_head(raw, name)
                heads[name] = (sup, blobs, raw if len(raw) < KEEP_DECODED_BELOW else None, marks)
            except (CorruptionError, UnsupportedVersion) as exc:
                if not tolerant:
                    raise
                if name not in {n for n, _m in self.errors}:  # a reload meets it again
                    self.errors.append((name, str(exc)))
        superseded = {f"index/{s.hex()}" for sup, _n, _raw, _g in heads.values() for s in sup}
        self._superseded |= superseded
        # A pack some file names as gone is added last: a blob also stored elsewhere (a
        # backup stored it again when it found the pack missing) is found there, the first
        # copy being the one kept. Its other blobs stay: a gone mark never loses one.
        gone = {p for name, (_s, _n, _r, marks) in heads.items() if name not in superseded for p in marks}
        later: list[IndexPack] = []
        # The table sized for all of them at once, not grown step by step as they are added.
        adding = sum(n for name, (_s, n, _r, _g) in heads.items() if name not in superseded)
        self._index.reserve(len(self._index) + adding)
        for name, (_sup, _n, kept, _g) in heads.items():
            if name in superseded:
                continue
            try:
                raw = kept if kept is not None else self.env.open(self.cache.fetch(name), aad=INDEX_AAD, what=name)
                packs = check_index(raw, name)
            except (CorruptionError, UnsupportedVersion) as exc:
                if not tolerant:
                    raise
                self.errors.append((name, str(exc)))
                continue
            for encoded in packs:
                p = decode_index_pack(encoded, name, checked=True)
                if p.id in gone:
                    later.append(p)
                else:
                    self._index.add_pack(p.id, p.blobs)
            del packs, raw
            self._loaded.add(name)
        for p in later:
            self._index.add_pack(p.id, p.blobs)
        if self._limits and heads:  # a rebuild, or new files, must not bring them back
            self._index.drop(self._limits)
        self.cache.prune("index", set(names))

    def refresh(self, *, force: bool = False, names: list[str] | None = None) -> bool:
        """Bring the in-memory index up to date (called once a lock is held): load new index
        files, and rebuild from scratch when a file loaded earlier was removed or superseded,
        since a prune or repair compacted the index and packs it named may be gone.
        ``force`` always rebuilds. ``names``: the listing of ``index/``, if just made.
        Returns True when it rebuilt."""
        if self._pending and not self._building:
            if not force:
                return False  # not built yet: the first use loads what is listed then
            self._build(lambda: self.load(tolerant=self._tolerant, names=names))
            return True
        listed = self.names() if names is None else names
        names_set = set(listed)
        rebuild = force or bool(self._loaded - names_set)
        for name in sorted(names_set - self._loaded - self._superseded):
            if rebuild:
                break
            try:  # only the head: a large new file is not built as objects (load adds it)
                sup, _n, gone = decode_index_head(self.env.open(self.cache.fetch(name), aad=INDEX_AAD, what=name),
                                                  name)
            except (CorruptionError, UnsupportedVersion):
                continue  # load reports it
            # A pack it names as gone that is indexed already: its blobs may be found there
            # first, so the index is built again with that pack last (load).
            rebuild = any(f"index/{s.hex()}" in self._loaded for s in sup) or any(
                self._index.has_pack(p) for p in gone)
        if rebuild:
            with self.lock:
                self._index = Index()
                self._loaded = set()
                self._superseded = set()
                self._faithful = not self._limits  # a rebuild drops those again (load)
                for pid, entries in self.unindexed:
                    self._index.add_pack(pid, entries)
        self.load(tolerant=bool(self.errors), names=listed)
        return rebuild

    def write_file(self, packs: PackList, supersedes: Iterable[str] = ()) -> str:
        """Write an index file naming ``packs``; returns its name. One that would be larger
        than readers take (INDEX_MAX) is written as two halves, the second superseding
        (as prune's chunks: a crash between them leaves duplicates, never missing entries).
        One pack's entries alone stay far below it: they are no larger than its header."""
        if self._pending:
            self._ensure()  # its name joins the loaded ones, which must be there first
        supersedes = list(supersedes)
        body = IndexFile(packs=[IndexPack(pid, entries) for pid, entries in packs],
                         supersedes=[bytes.fromhex(s.rsplit("/", 1)[-1]) for s in supersedes],
                         gone=sorted(self.gone))
        sealed = self.env.seal(encode_index(body), aad=INDEX_AAD)
        if len(sealed) > self.max_file and len(packs) > 1:
            del body, sealed
            self.write_file(packs[:len(packs) // 2])
            return self.write_file(packs[len(packs) // 2:], supersedes)
        name = f"index/{blake3.blake3(sealed).hexdigest()}"
        self.backend.put(name, sealed)
        self.cache.put(name, sealed)
        self._loaded.add(name)
        self._listed.add(name)
        self._wrote = True
        if body.supersedes:
            self._faithful = False  # what it supersedes is still in memory
        self.stats.add(index_files_written=1, bytes_written=len(sealed))
        return name

    def add_written_pack(self, pack_id: bytes, entries: list[PackEntry]) -> PackList:
        """Index a pack this process just wrote (caller holds ``lock``). Returns the packs an
        index file should name now (every ``INDEX_EVERY_PACKS``), or []."""
        self.index.add_pack(pack_id, entries)
        self.unindexed.append((pack_id, entries))
        if len(self.unindexed) < INDEX_EVERY_PACKS:
            return []
        todo, self.unindexed = self.unindexed, []
        return todo

    def forget_packs(self, limits: dict[bytes, int]) -> int:
        """Treat the blobs of packs that are gone (limit 0) or cut short (the size listed) as
        absent from here on, for every load too, and name those packs as gone in the index
        files this process writes. The index is then no longer what loading the files gives,
        so the local copy is not rewritten from it. Returns how many entries were dropped."""
        with self.lock:
            self._limits.update(limits)
            self.gone.update(limits)
            self._faithful = False
            return self.index.drop(limits)

    def write_unindexed(self) -> None:
        """Write an index file naming every pack that waits for one."""
        with self.lock:
            todo, self.unindexed = self.unindexed, []
        if todo:
            self.write_file(todo)
