"""Regular files of a restore, written into directories the walk (files.py) has opened.

Small files are written by the walker's own thread in batches whose blobs are read together,
loaded on worker threads a few batches ahead; large ones by a thread pool, their segments in
parallel (content.py). Each file is made under a temp name through its directory's fd, given
its content and metadata through its own fd, and renamed into place (target.py).
"""

from __future__ import annotations

import os
import stat
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from deltavault.errors import NO_SPACE_ERRNOS, CorruptionError, DeltavaultError, NoSpace
from deltavault.fs.dirfd import identity
from deltavault.fs.paths import display
from deltavault.model.content import Full
from deltavault.model.nodes import Node
from deltavault.objects.store import BlobReader
from deltavault.progress import Reporter
from deltavault.restore.content import verify_fd, write_content
from deltavault.restore.dirs import Dir, Holds
from deltavault.restore.ntfsmeta import NtfsTarget
from deltavault.restore.options import RestoreLog, RestoreOptions
from deltavault.restore.target import (
    LinkSources,
    MetaOptions,
    apply_node_meta,
    file_mode,
    install,
    temp_name,
    unlink_quiet,
)
from deltavault.workers import BoundedPool

# Files handed to the workers and not yet written. It bounds memory and the directories
# held open (each waits for its last file), while the walker keeps ahead of the workers.
IN_FLIGHT = 64
# Files smaller than this are written by the walker itself; larger ones by the workers,
# where decompression, decryption and hashing release the GIL for long stretches.
INLINE_BELOW = 1024 * 1024
SMALL_FILES = 256  # a batch of small files: at most this many,
SMALL_BYTES = 16 * 1024 * 1024  # and about this much content
LOADING = 2  # batches of small files loading ahead of the one being written
_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

Batch = list[tuple[Dir, bytes, Node]]


class RegularFiles:
    """Writes the regular files the walk hands over; the first error that ends the restore
    (a full target, an interrupt on a worker) is kept for the walker (``check_fatal``)."""

    def __init__(self, repo: BlobReader, options: RestoreOptions, log: RestoreLog, holds: Holds,
                 reporter: Reporter, meta: MetaOptions, links: LinkSources, ntfs: NtfsTarget | None) -> None:
        self.repo = repo
        self.opts = options
        self.log = log
        self.holds = holds
        self.reporter = reporter
        self._meta = meta
        self._links = links
        self._ntfs = ntfs
        self._pool = BoundedPool(options.workers, IN_FLIGHT, "dv-restore")
        # Segments of large files (restore/content.py); its own threads, since a file's task
        # on _pool waits for them.
        self._segments = ThreadPoolExecutor(max(2, options.workers), thread_name_prefix="dv-restore-seg")
        # The small files' blobs load on a thread of their own: queued behind a large file's
        # segments on _segments, the batches the walker waits for came late, and the walker
        # is the restore's critical path while large files are written beside it.
        self._loads = ThreadPoolExecutor(1, thread_name_prefix="dv-restore-load")
        self._last_hold: Callable[[], None] = lambda: None  # the hold of the last batch loaded
        self._lock = threading.Lock()  # guards _fatal
        self._fatal: BaseException | None = None
        self._small: Batch = []
        self._small_bytes = 0
        # Batches of small files whose blobs are being loaded on _loads, oldest first.
        self._loading: deque[tuple[Batch, Future[dict[bytes, bytes]]]] = deque()
        self._futures: list[Future[None]] = []

    def check_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    def drain(self) -> None:
        """Finish every file queued or being written: the directories waiting for them
        get their metadata and let go of their fds."""
        self.flush_small()
        for fut in self._futures:
            if not fut.cancelled():
                fut.result()
        self._futures = []

    def gathered_in(self, d: Dir) -> bool:
        """Whether a small file of ``d`` waits in a batch not yet written."""
        return any(here is d for batch in [self._small, *(items for items, _f in self._loading)]
                   for here, _r, _n in batch)

    def close(self) -> None:
        """End of the run, done or not: what was gathered and not written lets go of its
        directory, and the threads stop."""
        for batch in [self._small, *(items for items, _f in self._loading)]:
            for here, _rel, _node in batch:  # not written: an error ends the run
                self.holds.file_done(here)
        self._small, self._loading = [], deque()
        self._pool.shutdown()
        self._segments.shutdown()
        self._loads.shutdown()
        self._last_hold()

    def file(self, parent: Dir, relpath: bytes, node: Node) -> None:
        key = (node.dev, node.inode) if node.links > 1 else None
        assert self._links is not None
        if key is not None and key in self._links:
            self._links.link(key, parent.fd, node.name, shared=not parent.fresh)
            self.log.count(links=1)
            return
        self.holds.hold(parent, file=True)
        if key is not None:
            # Written now, by the walker: the next name of it may follow at once.
            self._links.reserve(key)
            try:
                self._write_guarded(parent, relpath, node, None, key)
            finally:
                self.holds.file_done(parent)
            return
        if node.size < INLINE_BELOW:
            # Written by the walker, in batches: handing small files to threads cost more
            # in GIL hand-offs (a million futex calls for 10k files) than writing them,
            # and one read per batch fetches neighbouring blobs together.
            self._small.append((parent, relpath, node))
            self._small_bytes += node.size
            if len(self._small) >= SMALL_FILES or self._small_bytes >= SMALL_BYTES:
                self._load_small()
                while len(self._loading) > LOADING:
                    self._write_small(*self._loading.popleft())
            return
        try:
            self._futures.append(self._pool.submit(self._file_task, parent, relpath, node))
        except BaseException:
            self.holds.file_done(parent)
            raise
        if len(self._futures) > 4 * IN_FLIGHT:
            self._futures = [f for f in self._futures if not f.done()]

    def _file_task(self, parent: Dir, relpath: bytes, node: Node) -> None:
        """On a worker. An error that ends the restore is kept for the walker, which stops
        at its next entry."""
        try:
            if self._fatal is None:
                self._write_guarded(parent, relpath, node, None, None)
        except BaseException as exc:
            with self._lock:
                if self._fatal is None:
                    self._fatal = exc
        finally:
            self.holds.file_done(parent)

    def _load_small(self) -> None:
        """Hand the batch of small files being gathered to _loads to load its blobs, in one
        pass (load_blobs merges neighbours in a pack into one request), while the walker
        writes the batches before it: decryption, decompression and hashing of the tree's
        small files had been on the walker's thread, after its file system calls."""
        items, self._small, self._small_bytes = self._small, [], 0
        if not items:
            return
        ids = list(dict.fromkeys(r.id for _d, _rel, n in items for r in n.content if isinstance(r, Full)))
        # A read-ahead reads their packs whole, in one GET each, and keeps them until the
        # next batch is loaded: consecutive batches read on in the same packs, which were
        # dropped between two batches while a large file's segments read other packs, and
        # fetched again (S3 restore, issue #17). This thread waits while others hold too
        # much (back-pressure), so memory stays bounded.
        release = self.repo.hold_blobs(ids, wait=True)
        previous, self._last_hold = self._last_hold, release
        try:
            fut = self._loads.submit(self._load_blobs, ids)
        except BaseException:
            previous()
            for here, _rel, _node in items:
                self.holds.file_done(here)
            raise
        fut.add_done_callback(lambda _f: previous())
        self._loading.append((items, fut))

    def _load_blobs(self, ids: list[bytes]) -> dict[bytes, bytes]:
        return dict(self.repo.load_blobs(ids)) if ids else {}

    def flush_small(self) -> None:
        """Write every small file gathered or being loaded."""
        self._load_small()
        while self._loading:
            self._write_small(*self._loading.popleft())

    def _write_small(self, items: Batch, fut: Future[dict[bytes, bytes]]) -> None:
        try:
            loaded = fut.result()
        except DeltavaultError:
            loaded = {}  # a damaged blob: each file loads its own and reports only itself
        except BaseException:
            for here, _rel, _node in items:
                self.holds.file_done(here)
            raise
        for i, (here, relpath, node) in enumerate(items):
            try:
                self._write_guarded(here, relpath, node, loaded, None)
            except BaseException:
                for later, _rel, _node in items[i + 1:]:
                    self.holds.file_done(later)
                raise
            finally:
                self.holds.file_done(here)

    def _write_guarded(self, parent: Dir, relpath: bytes, node: Node, loaded: dict[bytes, bytes] | None,
                       key: tuple[int, int] | None) -> None:
        try:
            self._write_file(parent, relpath, node, loaded or {}, key)
        except NoSpace:
            raise
        except CorruptionError as exc:
            self.log.problem(relpath, "corrupt", str(exc))
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                raise NoSpace(f"restore target is full while writing {display(relpath)}") from exc
            self.log.problem(relpath, "write", exc.strerror or str(exc))

    def _write_file(self, parent: Dir, relpath: bytes, node: Node, loaded: dict[bytes, bytes],
                    key: tuple[int, int] | None) -> None:
        tmp = temp_name(node.name)
        mode = file_mode(node, self._meta)
        exact = parent.made is not None and parent.made.exact(mode)
        fd = os.open(tmp, _FILE_FLAGS, mode if exact else 0o600, dir_fd=parent.fd)
        try:
            try:
                # The file system may give less than mode & ~umask (an sshfs server's umask, an
                # NFS server's inherited ACL): then it is chmodded. (fstat: cheaper than fchmod.)
                exact = exact and stat.S_IMODE(os.fstat(fd).st_mode) == mode
                expect = write_content(self.repo, fd, node, loaded, digests=self.opts.verify,
                                       pool=self._segments, window=max(2, self.opts.workers) + 1, fresh=True)
                if self._ntfs is not None:
                    self._ntfs.streams(parent.fd, tmp, fd, node, relpath)
                for m in apply_node_meta(fd, node, self._meta, made=parent.made, moded=exact):
                    self.log.problem(relpath, "metadata", m)
                if self.opts.verify:
                    n, bad = verify_fd(self.repo, fd, node.size, expect)
                    self.log.count(bytes_verified=n)
                    if bad:
                        self.log.problem(relpath, "verify", "read back differs from what was written: "
                                      + "; ".join(bad[:5]))
            except BaseException:
                unlink_quiet(parent.fd, tmp)
                raise
            install(parent.fd, tmp, node.name, None if parent.fresh else identity(os.fstat(fd)))
            if key is not None and self._links is not None:
                self._links.add(key, relpath, fd)
        finally:
            os.close(fd)
        self.log.count(files=1, bytes_written=node.size)
        self.reporter.advance(nbytes=node.size, items=1)
