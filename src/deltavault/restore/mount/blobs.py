"""Blobs for a long-lived reader that holds no lock: a bounded cache, read-ahead, and
recovery from a prune that ran meanwhile.

A mount may stay up for weeks; a shared lock held that long would keep prune's sweep
out for good. So a mount reads without a lock. That is safe because every object is
immutable and checked against its id when read: a reader can miss data, never see wrong
data. A prune that ran since the index was loaded shows up as a pack that is gone; then
the index is read again (prune wrote the new one before it deleted any pack) and the read
retried, which finds a repacked blob in its new pack. A blob that no index names after
that belongs to a snapshot that was forgotten and pruned: the read fails (EIO) and the
namespace drops the snapshot on its next listing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from deltavault.errors import CorruptionError, ObjectNotFound
from deltavault.model.content import ContentRef, Full, Hole, Patch
from deltavault.objects.patch import apply_patches
from deltavault.repository.repository import Repository

DEFAULT_CACHE = 256 << 20
READ_AHEAD_WORKERS = 2
READ_AHEAD_QUEUE = 8  # blobs being fetched ahead at most


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0  # plaintext bytes of the blobs read from the repository
    refreshes: int = 0  # index reloads after a pack had gone


class ByteCache:
    """Least-recently-used values up to ``limit`` bytes in all; each key is loaded once
    however many threads ask for it at the same time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._size = 0
        self._loading: dict[bytes, Future[bytes]] = {}
        self.stats = CacheStats()

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._items or key in self._loading

    def get(self, key: bytes, load: Callable[[], bytes]) -> bytes:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self.stats.hits += 1
                return value
            fut = self._loading.get(key)
            mine = fut is None
            if fut is None:
                fut = self._loading[key] = Future()
                self.stats.misses += 1
        if not mine:
            return fut.result()
        try:
            value = load()
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            fut.set_exception(exc)
            raise
        with self._lock:
            del self._loading[key]
            if len(value) <= self.limit // 4:  # one huge value must not flush everything
                self._items[key] = value
                self._size += len(value)
                while self._size > self.limit:
                    self._size -= len(self._items.popitem(last=False)[1])
        fut.set_result(value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0


def ref_key(ref: Full | Patch) -> bytes:
    return ref.id if isinstance(ref, Full) else b"P" + ref.base + b"".join(ref.patches)


class MountBlobs:
    """The bytes of content references, for many threads, without a repository lock."""

    def __init__(self, repo: Repository, cache_bytes: int = DEFAULT_CACHE,
                 read_ahead: int = READ_AHEAD_WORKERS) -> None:
        self.repo = repo
        self.cache = ByteCache(cache_bytes)
        self.generation = 0  # index reloads so far
        self._refresh_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(read_ahead, "dv-mount-ahead") if read_ahead else None
        self._ahead = threading.Semaphore(READ_AHEAD_QUEUE)

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    def refresh(self, seen: int) -> None:
        """Reload the index, unless another thread did since generation ``seen``."""
        with self._refresh_lock:
            if self.generation == seen:
                self.repo.refresh_index()
                self.generation += 1
                self.stats.refreshes += 1

    def load_blob(self, blob_id: bytes) -> bytes:
        """One blob, uncached (trees and block maps have caches of their own)."""
        seen = self.generation
        try:
            data = self.repo.load_blob(blob_id)
        except (ObjectNotFound, CorruptionError):
            # A pack a prune removed or repacked, or a blob only a newer index names.
            self.refresh(seen)
            data = self.repo.load_blob(blob_id)
        self.stats.bytes_loaded += len(data)
        return data

    def _load_ref(self, ref: Full | Patch) -> bytes:
        if isinstance(ref, Full):
            return self.load_blob(ref.id)
        return apply_patches(self.load_blob(ref.base), [self.load_blob(p) for p in ref.patches], ref.size)

    def ref_bytes(self, ref: Full | Patch) -> bytes:
        data = self.cache.get(ref_key(ref), lambda: self._load_ref(ref))
        # Checked on every use, not on loading: the cache is keyed by the blobs, and another
        # tree naming the same blob may say another size (a short read, not EIO, before).
        if len(data) != ref.size:
            blob = ref.id if isinstance(ref, Full) else ref.base
            raise CorruptionError(f"blob {blob.hex()[:16]} has {len(data)} bytes, tree says {ref.size}")
        return data

    def read_ahead(self, refs: list[ContentRef]) -> None:
        """Start fetching these references in the background (sequential readers)."""
        if self._pool is None:
            return
        for ref in refs:
            if isinstance(ref, Hole) or ref_key(ref) in self.cache:
                continue
            if not self._ahead.acquire(blocking=False):
                return
            try:
                self._pool.submit(self._ahead_one, ref)
            except RuntimeError:  # shut down
                self._ahead.release()
                return

    def _ahead_one(self, ref: Full | Patch) -> None:
        try:
            self.ref_bytes(ref)
        except Exception:
            pass  # the reader that needs it will meet the error itself
        finally:
            self._ahead.release()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
