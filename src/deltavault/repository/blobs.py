"""Blobs in and out of packs: sealing new blobs into packs (one uploader thread writes the
full ones), and reading blobs back, neighbours in a pack in one request.

Write order gives crash safety: packs first, then the index file naming them
(indexstore.py), then the snapshot naming the trees.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

from deltavault.backends.base import Backend, put_file
from deltavault.errors import CorruptionError
from deltavault.model.types import BlobType
from deltavault.repository.envelope import Envelope
from deltavault.repository.indexstore import IndexStore
from deltavault.repository.pack import BLOB_AAD, PackBuilder, pack_name

# load_blobs reads neighbouring blobs of a pack in one request when the gap between them is
# below GAP, up to SPAN bytes a request.
GAP = 256 * 1024
SPAN = 64 * 1024 * 1024
# prefetch hints a pack only for this many bytes of its blobs or more: a read-ahead fetches
# whole packs, which costs more than the reads of a few small files (a partial restore).
PREFETCH_MIN = 1024 * 1024


class BlobWriter:
    """Thread-safe. Data and tree/meta blobs go to separate packs."""

    def __init__(self, backend: Backend, env: Envelope, indexes: IndexStore, pack_size: int, *,
                 spool: bool = True, spool_dir: str | None = None) -> None:
        self.backend = backend
        self.spool = spool  # packs being filled go to temporary files, not memory (pack.py)
        self.spool_dir = spool_dir
        self.env = env
        self.indexes = indexes
        self.pack_size = pack_size
        self._lock = indexes.lock  # the index and the ids in flight change together
        self._pack_lock = threading.Lock()
        self._builders: dict[str, PackBuilder] = {}
        self._pending_ids: set[bytes] = set()  # sealed into a pack not yet indexed
        # The uploader is started by the first full pack, which two workers may fill at once:
        # both started one, each on a queue of its own, and a pack put on the queue nobody
        # read was never written (tests/unit/test_blobwriter_threads.py). So it is started,
        # and stopped by flush, under _start_lock; each uploader reads only its own queue.
        self._start_lock = threading.Lock()
        self._uploader: threading.Thread | None = None
        self._uploads: queue.Queue[PackBuilder | None] = queue.Queue(maxsize=2)
        self._upload_error: BaseException | None = None

    def save(self, btype: BlobType, data: bytes | memoryview, *, blob_id: bytes | None = None,
             level: int | None = None, compress: bool = True) -> tuple[bytes, int]:
        """Store a blob unless present. Returns (id, sealed bytes added)."""
        return self.save_many(btype, (data,), ids=(blob_id,) if blob_id else None, level=level,
                              compress=compress)[0]

    def save_many(self, btype: BlobType, items: Sequence[bytes | memoryview], *, ids: Sequence[bytes] | None = None,
                  level: int | None = None, compress: bool = True) -> list[tuple[bytes, int]]:
        """``[save(btype, x) for x in items]`` in one go: the new ones sealed together
        (``Envelope.seal_many``) and appended to the pack in one write, so a batch of small
        chunks takes the GIL a few times rather than a few times per chunk. ``ids``: the
        items' ids where the caller has them already."""
        self._raise_upload_error()
        if ids is None:
            ids = [self.env.blob_id(x) for x in items]
        out = [(bid, 0) for bid in ids]
        new: list[int] = []
        with self._lock:
            index, pending = self.indexes.index, self._pending_ids
            for i, bid in enumerate(ids):
                if bid not in pending and bid not in index:
                    pending.add(bid)
                    new.append(i)
        if not new:
            return out
        stored_upto = raw = added = 0  # new[:stored_upto] are in a pack, raw and sealed bytes
        kind = "data" if btype == BlobType.DATA else "tree"
        full: list[PackBuilder] = []
        try:
            sealed = self.env.seal_many([items[i] for i in new], compress=compress, level=level, aad=BLOB_AAD)
            with self._pack_lock:
                while stored_upto < len(new):
                    b = self._builders.get(kind)
                    if b is None:
                        b = self._builders[kind] = PackBuilder(spool=self.spool, spool_dir=self.spool_dir)
                    # as many as one at a time would put in this pack: until it is full
                    take, size, take_raw = [], len(b), 0
                    for k in range(stored_upto, len(new)):
                        head, body = sealed[k]
                        n = len(items[new[k]])
                        take.append((btype, ids[new[k]], sealed[k], n))
                        take_raw += n
                        size += len(head) + len(body)
                        if size >= self.pack_size:
                            break
                    for k, n in enumerate(b.add_many(take), stored_upto):
                        out[new[k]] = (ids[new[k]], n)
                        added += n
                    stored_upto += len(take)
                    raw += take_raw  # counted once in the pack
                    if len(b) >= self.pack_size:
                        full.append(self._builders.pop(kind))
        except BaseException:  # the ones not stored are not pending either
            with self._lock:
                for i in new[stored_upto:]:
                    self._pending_ids.discard(ids[i])
            raise
        finally:
            self.indexes.stats.add(blobs_added=stored_upto, bytes_added_raw=raw, bytes_added_stored=added)
            for f in full:  # in a pack already: written whatever else happened
                self._queue_upload(f)
        return out

    # Packs are finished and written by one uploader thread, so workers never wait on fsync;
    # the bounded queue keeps at most a few packs waiting (spooled: on disk, not in memory).
    def _queue_upload(self, builder: PackBuilder) -> None:
        with self._start_lock:
            if self._uploader is None:
                self._uploads = queue.Queue(maxsize=2)
                self._uploader = threading.Thread(target=self._upload_loop, args=(self._uploads,),
                                                  name="dv-upload", daemon=True)
                self._uploader.start()
            uploads = self._uploads
        uploads.put(builder)  # outside the lock: it waits while the queue is full
        self._raise_upload_error()

    def _upload_loop(self, uploads: queue.Queue[PackBuilder | None]) -> None:
        while True:
            builder = uploads.get()
            try:
                if builder is None:
                    return
                if self._upload_error is None:
                    self._upload(builder)
            except BaseException as exc:
                self._upload_error = exc
            finally:
                uploads.task_done()

    def _raise_upload_error(self) -> None:
        if self._upload_error is not None:
            raise self._upload_error

    def _upload(self, builder: PackBuilder) -> None:
        if builder.spooled:
            try:
                pid, fd, entries = builder.finish_spooled(self.env)
                put_file(self.backend, pack_name(pid), fd, len(builder))
            finally:
                builder.discard()
            size = len(builder)
        else:
            pid, data, entries = builder.finish(self.env)
            self.backend.put(pack_name(pid), data)
            size = len(data)
        with self._lock:
            to_index = self.indexes.add_written_pack(pid, entries)
            for e in entries:
                self._pending_ids.discard(e.id)
        self.indexes.stats.add(packs_written=1, bytes_written=size)
        if to_index:
            self.indexes.write_file(to_index)

    def flush(self) -> None:
        """Upload partly filled packs and write the index for everything written."""
        with self._pack_lock:
            builders = list(self._builders.values())
            self._builders.clear()
        with self._start_lock:
            uploader, uploads, self._uploader = self._uploader, self._uploads, None
        if uploader is not None:
            # Drain and stop the uploader: the next full pack starts a new one, so no idle
            # thread outlives a run.
            uploads.put(None)
            uploader.join()
            self._raise_upload_error()
        for b in builders:
            if b.entries:
                self._upload(b)
            else:
                b.discard()
        self.indexes.write_unindexed()


class BlobReader:
    def __init__(self, backend: Backend, env: Envelope, indexes: IndexStore) -> None:
        self.backend = backend
        self.env = env
        self.indexes = indexes
        # A read-ahead keeps packs of listings, which a walk reads all run long (readahead.py)
        self._favour: Callable[[str], None] | None = getattr(backend, "favour", None)

    def load(self, blob_id: bytes) -> bytes:
        loc = self.indexes.index.lookup(blob_id)
        if loc is None:
            raise CorruptionError(f"blob {blob_id.hex()[:16]} is missing from the index")
        if loc.type == BlobType.TREE and self._favour is not None:
            self._favour(pack_name(loc.pack_id))
        sealed = self.backend.get(pack_name(loc.pack_id), loc.offset, loc.length)
        if len(sealed) != loc.length:
            raise CorruptionError(f"blob {blob_id.hex()[:16]}: pack {loc.pack_id.hex()[:16]} is truncated")
        return self.open(blob_id, sealed)

    def open(self, blob_id: bytes, sealed: bytes | memoryview) -> bytes:
        """Unseal a blob read from a pack and check it against its id."""
        data = self.env.open(sealed, aad=BLOB_AAD, what=f"blob {blob_id.hex()[:16]}")
        if self.env.blob_id(data) != blob_id:
            raise CorruptionError(f"blob {blob_id.hex()[:16]}: content does not match its id")
        return data

    def hold(self, ids: Iterable[bytes], *, wait: bool = False) -> Callable[[], None]:
        """Tell a backend that reads ahead (backends/readahead.py) which ranges of which packs
        these blobs will be read from, and keep those packs until the returned function is
        called (the reads are done); other backends have nothing to do. ``wait``: the
        read-ahead's back-pressure, see ``ReadAheadBackend.hold``."""
        hint = getattr(self.backend, "hold", None)
        if hint is None or not getattr(self.backend, "reads_ahead", True):
            return lambda: None
        spans: dict[bytes, tuple[int, int, int]] = {}  # pack -> (first byte, end, bytes of blobs)
        for bid in dict.fromkeys(ids):
            loc = self.indexes.index.lookup(bid)
            if loc is not None:
                lo, hi, n = spans.get(loc.pack_id, (loc.offset, loc.offset + loc.length, 0))
                spans[loc.pack_id] = (min(lo, loc.offset), max(hi, loc.offset + loc.length), n + loc.length)
        # A pack with less of these blobs is held but not fetched ahead: another reader may
        # bring it whole meanwhile (a segment's last MiB of a pack its neighbour reads).
        releases = [hint(pack_name(pid), lo, hi - lo, wait=wait, ahead=n >= PREFETCH_MIN)
                    for pid, (lo, hi, n) in spans.items()]
        if not releases:
            return lambda: None

        def release() -> None:
            for r in releases:
                r()
        return release

    def load_many(self, ids: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """Load many blobs, reading neighbouring blobs of one pack in a single request."""
        by_pack: dict[bytes, list[tuple[int, int, bytes]]] = {}
        for bid in dict.fromkeys(ids):
            loc = self.indexes.index.lookup(bid)
            if loc is None:
                raise CorruptionError(f"blob {bid.hex()[:16]} is missing from the index")
            if loc.type == BlobType.TREE and self._favour is not None and loc.pack_id not in by_pack:
                self._favour(pack_name(loc.pack_id))
            by_pack.setdefault(loc.pack_id, []).append((loc.offset, loc.length, bid))
        # A read-ahead's view is the kept pack itself, not a copy of up to SPAN bytes of it.
        read = getattr(self.backend, "view", None) or (lambda n, o, ln: memoryview(self.backend.get(n, o, ln)))
        pin = getattr(self.backend, "hold", None) if getattr(self.backend, "reads_ahead", True) else None
        for pid, items in by_pack.items():
            items.sort()
            # A read-ahead keeps the pack while its reads here go on: split by gaps, a batch's
            # reads of one pack were two GETs of it when another thread's fetch came between.
            release = pin(pack_name(pid), items[0][0], items[-1][0] + items[-1][1] - items[0][0],
                          ahead=False) if pin is not None and len(items) > 1 else None
            try:
                yield from self._load_pack(pid, items, read)
            finally:
                if release is not None:
                    release()

    def _load_pack(self, pid: bytes, items: list[tuple[int, int, bytes]],
                   read: Callable[[str, int, int], memoryview]) -> Iterator[tuple[bytes, bytes]]:
        """The blobs ``items`` (offset, length, id; sorted) of one pack, neighbours read together."""
        i = 0
        while i < len(items):
            start = items[i][0]
            j = i
            end = items[i][0] + items[i][1]
            while (j + 1 < len(items) and items[j + 1][0] - end < GAP
                   and items[j + 1][0] + items[j + 1][1] - start < SPAN):
                j += 1
                end = max(end, items[j][0] + items[j][1])
            mv = read(pack_name(pid), start, end - start)
            if len(mv) != end - start:
                raise CorruptionError(f"pack {pid.hex()[:16]} is truncated")
            for off, ln, bid in items[i:j + 1]:
                yield bid, self.open(bid, mv[off - start: off - start + ln])
            i = j + 1
