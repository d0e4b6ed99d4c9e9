"""File-level backup engine (the archiver).

The main thread walks the tree, compares each entry's stat data with the previous run
and reads only what changed. Chunks go to a worker pool that hashes, compresses,
encrypts and packs them (the C code there releases the GIL). Directories are finished in
post-order once their files' chunks are stored; a directory whose entries are all
unchanged keeps its previous tree id without being re-encoded.
"""

from __future__ import annotations

import errno
import fnmatch
import gc
import os
import stat
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from deltavault.backup.content import (
    PAGES_PER_DIGEST_BLOB,
    ContentReader,
    FileChanged,
    Inflight,
    PendingContent,
)
from deltavault.backup.previous import PrevDir, PreviousState
from deltavault.chunking.cdc import Chunker
from deltavault.chunking.pages import DIGEST
from deltavault.errors import DeltavaultError
from deltavault.fs.meta import group_name, read_xattrs, user_name
from deltavault.fs.paths import display
from deltavault.model.content import ref_blob_ids
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.types import BlobType
from deltavault.progress import Reporter
from deltavault.tracking.catalog import CatalogWriter

# A file whose ctime is this close to the previous run's start may have changed again
# within the same timestamp tick after it was read ("racy" entries, as in git).
RACY_NS = 2_000_000_000
READ_ATTEMPTS = 3
DEFAULT_DELTA_THRESHOLD = 32 * 1024 * 1024


class Store(Protocol):
    """What the archiver needs from a repository."""

    def save_blob(self, btype: BlobType, data: bytes | memoryview, *, blob_id: bytes | None = None,
                  level: int | None = None, compress: bool = True) -> tuple[bytes, int]: ...

    def has_blob(self, blob_id: bytes) -> bool: ...

    def flush(self) -> None: ...


@dataclass
class Problem:
    path: str
    kind: str  # unreadable | vanished | changed | skipped | metadata
    message: str
    partial: bool = True  # counts toward exit code 3


@dataclass
class FileStats:
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs: int = 0
    bytes_read: int = 0
    bytes_total: int = 0


@dataclass
class Source:
    path: bytes  # where to read (maybe inside a snapshot)
    name: bytes  # name at the snapshot root


@dataclass
class FileBackupOptions:
    excludes: list[str] = field(default_factory=list)
    one_file_system: bool = False
    read_all: bool = False
    delta_threshold: int = DEFAULT_DELTA_THRESHOLD
    workers: int = 0
    # Entries whose ctime falls this close to the previous run's start are re-read. 2 s
    # covers file systems with 2-second timestamps (FAT); tests shorten it.
    racy_window_ns: int = RACY_NS
    skip_paths: set[bytes] = field(default_factory=set)  # e.g. the repository itself


@dataclass
class _Child:
    node: Node
    clean: bool
    content: PendingContent | None = None
    dirjob: _DirJob | None = None
    counted_size: int = 0


@dataclass
class _DirJob:
    relpath: bytes
    prev: PrevDir | None
    children: list[_Child]
    tree_id: bytes | None = None
    clean: bool = False


class FileArchiver:
    def __init__(self, store: Store, chunker: Chunker, previous: PreviousState, reporter: Reporter,
                 options: FileBackupOptions, *, page_key: bytes | None,
                 catalog: CatalogWriter | None = None) -> None:
        self.store = store
        self.previous = previous
        self.reporter = reporter
        self.opts = options
        self.catalog = catalog
        self.problems: list[Problem] = []
        self.stats = FileStats()
        self.page_blob_ids: set[bytes] = set()
        workers = options.workers or max(2, min(8, (os.cpu_count() or 2)))
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="dv-blob")
        self.content = ContentReader(store, self.pool, chunker, page_key=page_key,
                                     delta_threshold=options.delta_threshold,
                                     inflight=Inflight(max(64, 16 * workers) * 1024 * 1024))
        self._queue: deque[_DirJob] = deque()
        self._hardlinks: dict[tuple[int, int], _Child] = {}
        self._racy_before = previous.run_start_ns - options.racy_window_ns if previous.run_start_ns else -1
        self._root_dev = -1
        self._exclude = [p.encode() if isinstance(p, str) else p for p in options.excludes]

    # ------------------------------------------------------------------ public
    def run(self, sources: list[Source]) -> bytes:
        """Back up the sources as entries of one root tree; returns the root tree id."""
        old_limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old_limit, 20000))
        # A run allocates millions of short-lived, acyclic objects; the cyclic collector
        # scanning them cost 2-3% of CPU (perf). Collect rarely, not never.
        old_gc = gc.get_threshold()
        gc.set_threshold(200_000, 50, 50)
        try:
            root_prev = self.previous.dir(b"")
            children: list[_Child] = []
            for src in sources:
                child = self._entry(src.path, src.name, src.name, root_prev, top=True)
                if child is not None:
                    children.append(child)
            root = _DirJob(b"", root_prev, children)
            self._queue.append(root)
            self._drain(block=True)
            self.store.flush()
            assert root.tree_id is not None
            return root.tree_id
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.content.digester.close()
            sys.setrecursionlimit(old_limit)
            gc.set_threshold(*old_gc)

    # ------------------------------------------------------------------ problems
    def _problem(self, path: bytes, kind: str, message: str, *, partial: bool = True) -> None:
        p = Problem(display(path), kind, message, partial)
        self.problems.append(p)
        self.reporter.problem(p.path, kind, message)

    # ------------------------------------------------------------------ walking
    def _excluded(self, path: bytes, name: bytes) -> bool:
        if path in self.opts.skip_paths:
            return True
        for pat in self._exclude:
            if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(path, pat):
                return True
        return False

    def _entry(self, path: bytes, name: bytes, relpath: bytes, pdir: PrevDir | None,
               *, top: bool = False, st: os.stat_result | None = None) -> _Child | None:
        try:
            if st is None:
                st = os.lstat(path)
        except FileNotFoundError:
            self._problem(path, "vanished", "disappeared before it could be read")
            return None
        except OSError as exc:
            self._problem(path, "unreadable", exc.strerror or str(exc))
            return None
        if top:
            self._root_dev = st.st_dev
        prev = pdir.nodes.get(name) if pdir else None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            return self._dir(path, name, relpath, st, prev)
        if stat.S_ISREG(mode):
            return self._file(path, name, st, prev)
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(path)
            except OSError as exc:
                self._problem(path, "vanished" if exc.errno == errno.ENOENT else "unreadable",
                              exc.strerror or str(exc))
                return None
            node = self._node(path, name, NodeType.SYMLINK, st, target=target)
            return _Child(node, self._same_meta(node, prev))
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            t = NodeType.FIFO if stat.S_ISFIFO(mode) else NodeType.CHARDEV if stat.S_ISCHR(mode) else NodeType.BLOCKDEV
            node = self._node(path, name, t, st, rdev=st.st_rdev)
            return _Child(node, self._same_meta(node, prev))
        if stat.S_ISSOCK(mode):
            self._problem(path, "skipped", "socket: not saved (it is recreated by its server)", partial=False)
            return None
        self._problem(path, "skipped", f"unknown file type {stat.S_IFMT(mode):o}", partial=False)
        return None

    def _node(self, path: bytes, name: bytes, ntype: NodeType, st: os.stat_result, **kw: object) -> Node:
        try:
            xattrs = read_xattrs(path)
        except OSError as exc:
            self._problem(path, "metadata", f"extended attributes unreadable: {exc.strerror}")
            xattrs = []
        links = st.st_nlink if ntype != NodeType.DIR else 1
        return Node(name=name, type=ntype, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                    user=user_name(st.st_uid), group=group_name(st.st_gid), mtime=st.st_mtime_ns,
                    atime=st.st_atime_ns, ctime=st.st_ctime_ns,
                    size=st.st_size if ntype == NodeType.FILE else 0,
                    inode=st.st_ino, links=links, dev=st.st_dev if links > 1 else 0,
                    xattrs=xattrs, **kw)  # type: ignore[arg-type]

    @staticmethod
    def _same_meta(node: Node, prev: Node | None) -> bool:
        if prev is None:
            return False
        return msgspec.structs.replace(node, atime=prev.atime) == prev

    def _dir(self, path: bytes, name: bytes, relpath: bytes, st: os.stat_result, prev: Node | None) -> _Child:
        node = self._node(path, name, NodeType.DIR, st)
        self.stats.dirs += 1
        subprev = self.previous.dir(relpath) if prev is not None and prev.type == NodeType.DIR else None
        if self.opts.one_file_system and st.st_dev != self._root_dev:
            job = _DirJob(relpath, subprev, [])
        else:
            job = _DirJob(relpath, subprev, self._list(path, relpath, subprev))
        self._queue.append(job)
        self._drain(block=len(self._queue) > 4096)
        clean = prev is not None and self._same_meta(msgspec.structs.replace(node, subtree=prev.subtree), prev)
        return _Child(node, clean, dirjob=job)

    def _list(self, path: bytes, relpath: bytes, pdir: PrevDir | None) -> list[_Child]:
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            self._problem(path, "vanished", "directory disappeared while being read")
            return []
        except OSError as exc:
            self._problem(path, "unreadable", f"directory cannot be listed: {exc.strerror}")
            return []
        out = []
        for e in entries:
            name = e.name
            child_path = e.path
            if self._excluded(child_path, name):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                self._problem(child_path, "vanished", "disappeared before it could be read")
                continue
            except OSError as exc:
                self._problem(child_path, "unreadable", exc.strerror or str(exc))
                continue
            child = self._entry(child_path, name, relpath + b"/" + name if relpath else name, pdir, st=st)
            if child is not None:
                out.append(child)
        return out

    # ------------------------------------------------------------------ files
    def _reusable(self, prev: Node | None, st: os.stat_result) -> bool:
        if self.opts.read_all or prev is None or prev.type != NodeType.FILE:
            return False
        if (prev.size, prev.mtime, prev.ctime, prev.inode) != (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino):
            return False
        if prev.ctime >= self._racy_before:
            return False
        if self.previous.blobs_trusted:
            return True
        has = self.store.has_blob
        if prev.pages and not all(has(p) for p in prev.pages):
            return False
        return all(has(b) for r in prev.content for b in ref_blob_ids(r))

    def _file(self, path: bytes, name: bytes, st: os.stat_result, prev: Node | None) -> _Child | None:
        hl_key = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
        if hl_key is not None and hl_key in self._hardlinks:
            first = self._hardlinks[hl_key]
            node = msgspec.structs.replace(first.node, name=name)
            return _Child(node, first.clean and prev is not None and node == prev, content=first.content)
        self.stats.bytes_total += st.st_size
        if self._reusable(prev, st):
            assert prev is not None
            node = prev if not hl_key else msgspec.structs.replace(prev, dev=st.st_dev, links=st.st_nlink)
            self.stats.files_unmodified += 1
            self.reporter.advance(nbytes=st.st_size, items=1)
            if prev.pages:
                self.page_blob_ids.update(prev.pages)
                self._remember_pages(prev.pages)
            child: _Child | None = _Child(node, node == prev)
        else:
            child = self._read_file(path, name, st, prev)
        if child is not None and hl_key is not None:
            self._hardlinks[hl_key] = child
        return child

    def _remember_pages(self, ids: list[bytes]) -> None:
        if self.catalog is None or self.previous.kind == "catalog":
            return
        for pid in ids:
            data = self.previous.meta_blob(pid)
            if data is not None:
                self.catalog.put_blob(pid, data)

    def _prev_digests(self, prev: Node | None) -> bytes | None:
        if prev is None or not prev.pages or prev.type != NodeType.FILE:
            return None
        if not all(self.store.has_blob(b) for r in prev.content for b in ref_blob_ids(r)):
            return None
        parts = []
        for pid in prev.pages:
            data = self.previous.meta_blob(pid)
            if data is None:
                return None
            parts.append(data)
        dig = b"".join(parts)
        return dig if len(dig) == -(-prev.size // 4096) * DIGEST else None

    def _read_file(self, path: bytes, name: bytes, st: os.stat_result, prev: Node | None) -> _Child | None:
        flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0) | getattr(os, "O_CLOEXEC", 0)
        prev_dig = None if self.opts.read_all else self._prev_digests(prev)
        prev_refs = prev.content if prev_dig is not None and prev is not None else None
        last_exc: Exception | None = None
        for _attempt in range(READ_ATTEMPTS):
            try:
                try:
                    fd = os.open(path, flags)
                except PermissionError:
                    if not flags & getattr(os, "O_NOATIME", 0):
                        raise
                    flags &= ~getattr(os, "O_NOATIME", 0)  # O_NOATIME needs ownership
                    fd = os.open(path, flags)
            except FileNotFoundError:
                self._problem(path, "vanished", "disappeared before it could be read")
                return None
            except OSError as exc:
                kind = "changed" if exc.errno == errno.ELOOP else "unreadable"
                msg = "replaced by a symlink while being read" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
                self._problem(path, kind, msg)
                return None
            try:
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode):
                    self._problem(path, "changed", "no longer a regular file")
                    return None
                try:
                    pending = self.content.read(fd, fst, prev_refs, prev_dig, path)
                except FileChanged as exc:
                    last_exc = exc
                    continue
                after = os.fstat(fd)
            except OSError as exc:
                self._problem(path, "unreadable", f"read error: {exc.strerror or exc}")
                return None
            finally:
                os.close(fd)
            changed = (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (fst.st_size, fst.st_mtime_ns, fst.st_ctime_ns)
            if changed and _attempt < READ_ATTEMPTS - 1:
                last_exc = FileChanged("modified while being read")
                continue
            if changed:
                self._problem(path, "changed",
                              f"modified while being read {READ_ATTEMPTS} times; stored the last read, "
                              "which may mix old and new data; the next run reads it again")
            return self._finish_read(path, name, fst, prev, pending)
        self._problem(path, "changed", f"kept changing while being read: {last_exc}")
        return None

    def _finish_read(self, path: bytes, name: bytes, fst: os.stat_result, prev: Node | None,
                     pending: PendingContent) -> _Child:
        if prev is None or prev.type != NodeType.FILE:
            self.stats.files_new += 1
        else:
            self.stats.files_changed += 1
        self.stats.bytes_read += pending.bytes_read
        self.reporter.advance(nbytes=fst.st_size, items=1)
        node = self._node(path, name, NodeType.FILE, fst)
        return _Child(node, False, content=pending)

    # ------------------------------------------------------------------ finishing directories
    def _drain(self, *, block: bool) -> None:
        if block:
            self.content.flush_batch()
        while self._queue:
            job = self._queue[0]
            if not block and not all(c.content is None or _done(c.content) for c in job.children):
                return
            self._finish_dir(job)
            self._queue.popleft()

    def _resolve(self, child: _Child) -> Node:
        node = child.node
        if child.content is not None:
            refs = child.content.refs()
            digests = child.content.digest_bytes()
            pages = self._save_pages(digests) if digests is not None else None
            node = msgspec.structs.replace(node, content=refs, pages=pages)
            child.node = node
            child.content = None  # hard-linked siblings share the resolved node's content
        if child.dirjob is not None:
            assert child.dirjob.tree_id is not None
            if child.clean and child.node.subtree != child.dirjob.tree_id:
                child.clean = False
            node = msgspec.structs.replace(node, subtree=child.dirjob.tree_id)
            if not child.dirjob.clean:
                child.clean = False
        return node

    def _save_pages(self, digests: bytes) -> list[bytes]:
        ids = []
        step = PAGES_PER_DIGEST_BLOB * DIGEST
        for i in range(0, len(digests), step):
            piece = digests[i:i + step]
            bid, _ = self.store.save_blob(BlobType.META, piece, compress=False)
            ids.append(bid)
            if self.catalog is not None:
                self.catalog.put_blob(bid, piece)
        self.page_blob_ids.update(ids)
        return ids

    def _finish_dir(self, job: _DirJob) -> None:
        if self.catalog is not None:
            self.catalog.visit(job.relpath)
        nodes = []
        for c in job.children:
            # Hard-linked siblings: the first one resolved holds the content.
            nodes.append(self._resolve(c))
        prev = job.prev
        if (prev is not None and all(c.clean for c in job.children)
                and len(job.children) == len(prev.nodes) and self.store.has_blob(prev.tree_id)):
            job.tree_id, job.clean = prev.tree_id, True
            if self.catalog is not None and self.previous.kind != "catalog":
                self.catalog.put_dir(job.relpath, prev.tree_id, msgspec.msgpack.encode(Tree(nodes)))
            return
        raw = msgspec.msgpack.encode(Tree(nodes))
        tid, _ = self.store.save_blob(BlobType.TREE, raw)
        job.tree_id = tid
        job.clean = prev is not None and tid == prev.tree_id
        if self.catalog is not None:
            self.catalog.put_dir(job.relpath, tid, raw)


def _done(p: PendingContent) -> bool:
    return all(getattr(x, "done", lambda: True)() for x in p.parts) and (
        not isinstance(p.digests, Future) or p.digests.done())


__all__ = ["DeltavaultError", "FileArchiver", "FileBackupOptions", "FileStats", "Problem", "Source"]
