"""File-level backup engine (the archiver).

The main thread walks the tree, compares each entry's stat data with the previous run
and reads only what changed. Chunks go to a worker pool that hashes, compresses,
encrypts and packs them (the C code there releases the GIL). Directories are finished in
post-order once their files' chunks are stored; a directory whose entries are all
unchanged keeps its previous tree id without being re-encoded.

The walk never resolves a path: each directory is opened by name from its parent's fd
(``O_NOFOLLOW | O_DIRECTORY``) and must be the directory the listing saw (dev, ino);
entries are looked up, opened and read relative to it. So no path length or depth limit
applies, a directory swapped for a symlink during the run is never followed, and no
directory is entered twice (a bind mount of a directory inside the source onto another
place in it). The walk keeps its own stack, never the Python one. Paths are only built
for messages, exclusion patterns and catalog keys.
"""

from __future__ import annotations

import errno
import fnmatch
import gc
import os
import stat
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from deltavault.backup.files.catalog import CatalogWriter
from deltavault.backup.files.content import ContentReader
from deltavault.backup.files.delta import PrevContent
from deltavault.backup.files.fileio import FileChanged
from deltavault.backup.files.pending import PendingContent
from deltavault.backup.files.previous import PrevDir, PreviousState
from deltavault.chunking.cdc import Chunker
from deltavault.chunking.pages import segment_count
from deltavault.errors import DeltavaultError
from deltavault.fs.dirfd import DIR_FLAGS, Identity, fd_path, handle_at, identity, open_dir_at
from deltavault.fs.meta import group_name, read_xattrs, user_name
from deltavault.fs.paths import display
from deltavault.model.content import ref_blob_ids
from deltavault.model.nodes import Node, NodeType
from deltavault.model.types import BlobType
from deltavault.objects.trees import encode_tree
from deltavault.progress import Reporter
from deltavault.workers import Inflight

# A file whose ctime is this close to the previous run's start may have changed again
# within the same timestamp tick after it was read ("racy" entries, as in git).
RACY_NS = 2_000_000_000
READ_ATTEMPTS = 3
DEFAULT_DELTA_THRESHOLD = 32 * 1024 * 1024
# Directory fds the walk holds at most. Deeper than this, the fds of the shallowest
# ancestors (but the source's own) are closed, and each is opened again through ".." of
# its child when the walk climbs back, and must then be the directory it was (dev, ino);
# if it is not (it was moved meanwhile), it is looked up again by name from the source,
# checked level by level. So any depth backs up within a fixed number of open files,
# whatever RLIMIT_NOFILE is (the soft limit is often 1024).
MAX_OPEN_DIRS = 128
# Files are opened through an O_PATH handle checked to be a regular file: opening whatever
# was swapped in under the name between its stat and its open could block (a FIFO) or act
# (a device: a tape rewinds, a watchdog arms), and O_PATH opens nothing.
FILE_FLAGS = os.O_RDONLY | os.O_CLOEXEC
O_NOATIME = getattr(os, "O_NOATIME", 0)


class Store(Protocol):
    """What the archiver needs from a repository."""

    def save_blob(self, btype: BlobType, data: bytes | memoryview, *, blob_id: bytes | None = None,
                  level: int | None = None, compress: bool = True) -> tuple[bytes, int]: ...

    def has_blob(self, blob_id: bytes) -> bool: ...

    def blob_id(self, data: bytes | memoryview) -> bytes: ...

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
    # e.g. the repository itself; matched by identity (st_dev, st_ino) of what each path
    # names when the run starts, so another path to it (a bind mount, a symlink) is skipped too
    skip_paths: set[bytes] = field(default_factory=set)


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


@dataclass
class _Frame:
    """A directory the walk is in: open (``fd``) or, deep down, closed for now (-1)."""

    fd: int
    ident: Identity
    name: bytes  # its name in its parent (to look it up again)
    path: bytes
    relpath: bytes
    names: list[bytes]  # its entries, sorted
    prev: PrevDir | None  # its previous listing
    node: Node
    clean: bool  # its own metadata is unchanged
    children: list[_Child] = field(default_factory=list)
    next: int = 0  # index in names of the next entry
    lost: bool = False  # moved away during the run: the rest of it cannot be read


def _join(base: bytes, name: bytes) -> bytes:
    return base + b"/" + name if base else name


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
                                     inflight=Inflight(max(32, 8 * workers) * 1024 * 1024),
                                     save_pages=self._save_page_segment)
        self._queue: deque[_DirJob] = deque()
        self._hardlinks: dict[tuple[int, int], _Child] = {}
        self._racy_before = previous.run_start_ns - options.racy_window_ns if previous.run_start_ns else -1
        self._root_dev = -1
        self._exclude = [p.encode() if isinstance(p, str) else p for p in options.excludes]
        self._skip_ids: set[Identity] = set()
        self._entered: set[int] = set()  # directories entered: dev << 64 | ino
        self._zero_segment_id: bytes | None = None

    # ------------------------------------------------------------------ public
    def run(self, sources: list[Source]) -> bytes:
        """Back up the sources as entries of one root tree; returns the root tree id."""
        # A run allocates millions of short-lived, acyclic objects; the cyclic collector
        # scanning them cost 2-3% of CPU (perf). Collect rarely, not never.
        old_gc = gc.get_threshold()
        gc.set_threshold(200_000, 50, 50)
        try:
            for p in self.opts.skip_paths:
                try:
                    self._skip_ids.add(identity(os.stat(p)))
                except OSError:
                    pass  # not there: nothing to skip
            root_prev = self.previous.dir(b"")
            children: list[_Child] = []
            for src in sources:
                child = self._source(src, root_prev)
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
            gc.set_threshold(*old_gc)

    # ------------------------------------------------------------------ problems
    def _problem(self, path: bytes, kind: str, message: str, *, partial: bool = True) -> None:
        p = Problem(display(path), kind, message, partial)
        self.problems.append(p)
        self.reporter.problem(p.path, kind, message)

    def _os_problem(self, path: bytes, exc: OSError, what: str = "") -> None:
        if isinstance(exc, FileNotFoundError):
            self._problem(path, "vanished", "disappeared before it could be read")
        else:
            self._problem(path, "unreadable", what + (exc.strerror or str(exc)))

    # ------------------------------------------------------------------ walking
    def _excluded(self, path: bytes, name: bytes) -> bool:
        for pat in self._exclude:
            if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(path, pat):
                return True
        return False

    def _source(self, src: Source, root_prev: PrevDir | None) -> _Child | None:
        """One source: looked up by its path (the user's, symlinks in it followed as given),
        then walked by fd."""
        parent, fsname = os.path.split(src.path)
        prev = root_prev.nodes.get(src.name) if root_prev else None
        try:
            pfd = os.open(parent or b"/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self._os_problem(src.path, exc)
            return None
        try:
            if not fsname:  # the root directory itself
                st = os.fstat(pfd)
                self._root_dev = st.st_dev
                got = self._dir_entry(pfd, b".", src.name, src.path, src.name, st, prev)
            else:
                try:
                    st = os.stat(fsname, dir_fd=pfd, follow_symlinks=False)
                except OSError as exc:
                    self._os_problem(src.path, exc)
                    return None
                self._root_dev = st.st_dev
                got = self._entry(pfd, fsname, src.name, src.path, src.name, root_prev, st)
        finally:
            os.close(pfd)
        return self._walk(got) if isinstance(got, _Frame) else got

    def _walk(self, top: _Frame) -> _Child | None:
        """Walk the tree under ``top`` depth-first with an explicit stack; directories are
        finished in post-order."""
        stack = [top]
        closed_below = 1  # frames [1, closed_below) have their fd closed (MAX_OPEN_DIRS)
        try:
            while True:
                f = stack[-1]
                if f.next < len(f.names) and not f.lost:
                    fsname = f.names[f.next]
                    f.next += 1
                    got = self._list_entry(f, fsname)
                    if isinstance(got, _Frame):
                        stack.append(got)
                        if len(stack) - closed_below > MAX_OPEN_DIRS:
                            os.close(stack[closed_below].fd)
                            stack[closed_below].fd = -1
                            closed_below += 1
                    elif got is not None:
                        f.children.append(got)
                    continue
                child = self._finish_frame(f)
                if len(stack) == 1:
                    return child
                stack.pop()
                if stack[-1].fd < 0:
                    self._reopen(stack, f)
                    closed_below = len(stack) - 1
                if f.fd >= 0:
                    os.close(f.fd)
                    f.fd = -1
                stack[-1].children.append(child)
        finally:
            for f in stack:
                if f.fd >= 0:
                    os.close(f.fd)
                    f.fd = -1

    def _reopen(self, stack: list[_Frame], child: _Frame) -> None:
        """Open again the (closed) directory on top of ``stack``: through ".." of ``child``,
        or else by name from the source, each level checked to be what it was."""
        f = stack[-1]
        if child.fd >= 0:
            try:
                fd = os.open(b"..", DIR_FLAGS, dir_fd=child.fd)
                if identity(os.fstat(fd)) == f.ident:
                    f.fd = fd
                    return
                os.close(fd)
            except OSError:
                pass
        fd = os.dup(stack[0].fd)
        try:
            for level in stack[1:]:
                nfd = open_dir_at(fd, level.name)
                os.close(fd)
                fd = nfd
                if identity(os.fstat(fd)) != level.ident:
                    raise OSError(errno.ESTALE, "replaced")
        except OSError:
            os.close(fd)
            f.lost = True
            self._problem(f.path, "changed", "moved during the backup; its entries after "
                          f"{display(f.names[f.next - 1]) if f.next else 'the start'} were not read")
            return
        f.fd = fd

    def _list_entry(self, f: _Frame, fsname: bytes) -> _Child | _Frame | None:
        path = f.path + fsname if f.path.endswith(b"/") else f.path + b"/" + fsname
        if self._excluded(path, fsname):
            return None
        try:
            st = os.stat(fsname, dir_fd=f.fd, follow_symlinks=False)
        except OSError as exc:
            self._os_problem(path, exc)
            return None
        if identity(st) in self._skip_ids:
            return None
        return self._entry(f.fd, fsname, fsname, path, _join(f.relpath, fsname), f.prev, st)

    def _entry(self, dir_fd: int, fsname: bytes, name: bytes, path: bytes, relpath: bytes,
               pdir: PrevDir | None, st: os.stat_result) -> _Child | _Frame | None:
        """The entry ``fsname`` of ``dir_fd``, stored under ``name``; a directory comes back
        as a frame to walk."""
        prev = pdir.nodes.get(name) if pdir else None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            return self._dir_entry(dir_fd, fsname, name, path, relpath, st, prev)
        if stat.S_ISREG(mode):
            return self._file(dir_fd, fsname, name, path, st, prev)
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(fsname, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    self._problem(path, "changed", "no longer a symlink when read")
                else:
                    self._os_problem(path, exc)
                return None
            xattrs = self._handle_xattrs(dir_fd, fsname, path, st)
            if xattrs is None:
                return None
            node = self._node(name, NodeType.SYMLINK, st, xattrs, target=target)
            return _Child(node, self._same_meta(node, prev))
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            t = NodeType.FIFO if stat.S_ISFIFO(mode) else NodeType.CHARDEV if stat.S_ISCHR(mode) else NodeType.BLOCKDEV
            xattrs = self._handle_xattrs(dir_fd, fsname, path, st)
            if xattrs is None:
                return None
            node = self._node(name, t, st, xattrs, rdev=st.st_rdev)
            return _Child(node, self._same_meta(node, prev))
        if stat.S_ISSOCK(mode):
            self._problem(path, "skipped", "socket: not saved (it is recreated by its server)", partial=False)
            return None
        self._problem(path, "skipped", f"unknown file type {stat.S_IFMT(mode):o}", partial=False)
        return None

    # ------------------------------------------------------------------ metadata
    def _fd_xattrs(self, fd: int, path: bytes) -> list[tuple[bytes, bytes]]:
        try:
            return read_xattrs(b"", fd=fd)
        except OSError as exc:
            self._problem(path, "metadata", f"extended attributes unreadable: {exc.strerror}")
            return []

    def _handle_xattrs(self, dir_fd: int, fsname: bytes, path: bytes,
                       st: os.stat_result) -> list[tuple[bytes, bytes]] | None:
        """xattrs of an entry that is not opened (symlink, FIFO, device), through an O_PATH
        handle to it; None (reported) if it is no longer the entry that was listed."""
        try:
            h, hst = handle_at(dir_fd, fsname)
        except OSError as exc:
            self._os_problem(path, exc)
            return None
        try:
            if identity(hst) != identity(st):
                self._problem(path, "changed", "replaced while being read")
                return None
            try:
                return read_xattrs(fd_path(h), follow=True)
            except OSError as exc:
                self._problem(path, "metadata", f"extended attributes unreadable: {exc.strerror}")
                return []
        finally:
            os.close(h)

    def _node(self, name: bytes, ntype: NodeType, st: os.stat_result, xattrs: list[tuple[bytes, bytes]],
              **kw: object) -> Node:
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

    # ------------------------------------------------------------------ directories
    def _dir_entry(self, dir_fd: int, fsname: bytes, name: bytes, path: bytes, relpath: bytes,
                   st: os.stat_result, prev: Node | None) -> _Child | _Frame | None:
        subprev = self.previous.dir(relpath) if prev is not None and prev.type == NodeType.DIR else None
        try:
            fd = open_dir_at(dir_fd, fsname)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                self._problem(path, "changed", "replaced by a non-directory during the backup; not followed")
                return None
            if isinstance(exc, FileNotFoundError):
                self._os_problem(path, exc)
                return None
            # Unreadable (EACCES): kept as an empty directory, the run is partial.
            self._problem(path, "unreadable", f"directory cannot be listed: {exc.strerror or exc}")
            xattrs = self._handle_xattrs(dir_fd, fsname, path, st)
            if xattrs is None:
                return None
            return self._empty_dir(self._node(name, NodeType.DIR, st, xattrs), relpath, subprev, prev)
        try:
            fst = os.fstat(fd)
            if identity(fst) != identity(st):
                self._problem(path, "changed", "replaced by another directory during the backup; not read")
                os.close(fd)
                return None
            node = self._node(name, NodeType.DIR, fst, self._fd_xattrs(fd, path))
            key = fst.st_dev << 64 | fst.st_ino
            if key in self._entered:
                self._problem(path, "skipped", "a directory already backed up at another path in this "
                              "run (a bind mount): stored here as an empty directory", partial=False)
                os.close(fd)
                return self._empty_dir(node, relpath, subprev, prev)
            if self.opts.one_file_system and fst.st_dev != self._root_dev:
                os.close(fd)
                return self._empty_dir(node, relpath, subprev, prev)
            self._entered.add(key)
            names = sorted(os.fsencode(n) for n in os.listdir(fd))
        except OSError as exc:
            os.close(fd)
            self._problem(path, "unreadable", f"directory cannot be listed: {exc.strerror or exc}")
            return self._empty_dir(self._node(name, NodeType.DIR, st, []), relpath, subprev, prev)
        self.stats.dirs += 1
        return _Frame(fd, identity(fst), fsname, path, relpath, names, subprev, node, self._dir_clean(node, prev))

    @staticmethod
    def _dir_clean(node: Node, prev: Node | None) -> bool:
        return prev is not None and FileArchiver._same_meta(msgspec.structs.replace(node, subtree=prev.subtree), prev)

    def _empty_dir(self, node: Node, relpath: bytes, subprev: PrevDir | None, prev: Node | None) -> _Child:
        """A directory stored without its entries (unreadable, already seen, another file system)."""
        self.stats.dirs += 1
        job = _DirJob(relpath, subprev, [])
        self._queue.append(job)
        return _Child(node, self._dir_clean(node, prev), dirjob=job)

    def _finish_frame(self, f: _Frame) -> _Child:
        job = _DirJob(f.relpath, f.prev, f.children)
        self._queue.append(job)
        self._drain(block=len(self._queue) > 4096)
        return _Child(f.node, f.clean, dirjob=job)

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

    def _file(self, dir_fd: int, fsname: bytes, name: bytes, path: bytes, st: os.stat_result,
              prev: Node | None) -> _Child | None:
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
            child = self._read_file(dir_fd, fsname, name, path, st, prev)
        if child is not None and hl_key is not None:
            self._hardlinks[hl_key] = child
        return child

    def _save_page_segment(self, data: bytes | None) -> bytes:
        """Store one segment of page digests (None: the all-holes one) and cache it in the
        catalog; called as each segment completes, also from the digest helper's reader."""
        if data is None and self._zero_segment_id is not None:
            return self._zero_segment_id
        raw = self.content.zero_segment if data is None else data
        bid, _ = self.store.save_blob(BlobType.META, raw, compress=False)
        if self.catalog is not None:
            self.catalog.put_blob(bid, raw)
        if data is None:
            self._zero_segment_id = bid
        return bid

    def _remember_pages(self, ids: list[bytes]) -> None:
        if self.catalog is None or self.previous.kind == "catalog":
            return
        for pid in dict.fromkeys(ids):  # one load each, however often a hole segment repeats
            data = self.previous.meta_blob(pid)
            if data is not None:
                self.catalog.put_blob(pid, data)

    def _prev_content(self, prev: Node | None) -> PrevContent | None:
        """What the delta path compares with, if the previous version can serve: its page
        digests (loaded one segment at a time, when needed) and chunks still stored."""
        if self.opts.read_all or prev is None or not prev.pages or prev.type != NodeType.FILE:
            return None
        if len(prev.pages) != segment_count(prev.size):
            return None
        if not all(self.store.has_blob(b) for r in prev.content for b in ref_blob_ids(r)):
            return None
        return PrevContent(prev.content, prev.pages, prev.size, self.previous.meta_blob, self.store.blob_id)

    def _open_file(self, dir_fd: int, fsname: bytes, path: bytes) -> int | None:
        """The regular file ``fsname`` of ``dir_fd``, opened for reading, or None (reported)."""
        try:
            h, hst = handle_at(dir_fd, fsname)
        except OSError as exc:
            self._os_problem(path, exc)
            return None
        try:
            if not stat.S_ISREG(hst.st_mode):
                self._problem(path, "changed", "no longer a regular file when opened; not read")
                return None
            try:
                return os.open(fd_path(h), FILE_FLAGS | O_NOATIME)
            except PermissionError:
                if not O_NOATIME:
                    raise
                return os.open(fd_path(h), FILE_FLAGS)  # O_NOATIME needs ownership
        except OSError as exc:
            self._os_problem(path, exc)
            return None
        finally:
            os.close(h)

    def _read_file(self, dir_fd: int, fsname: bytes, name: bytes, path: bytes, st: os.stat_result,
                   prev: Node | None) -> _Child | None:
        prev_content = self._prev_content(prev)
        last_exc: Exception | None = None
        for attempt in range(READ_ATTEMPTS):
            fd = self._open_file(dir_fd, fsname, path)
            if fd is None:
                return None
            try:
                fst = os.fstat(fd)  # the inode the checked handle named
                try:
                    pending = self.content.read(fd, fst, prev_content)
                except FileChanged as exc:
                    last_exc = exc
                    continue
                after = os.fstat(fd)
                changed = (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
                    fst.st_size, fst.st_mtime_ns, fst.st_ctime_ns)
                if changed and attempt < READ_ATTEMPTS - 1:
                    last_exc = FileChanged("modified while being read")
                    continue
                if changed:
                    self._problem(path, "changed",
                                  f"modified while being read {READ_ATTEMPTS} times; stored the last read, "
                                  "which may mix old and new data; the next run reads it again")
                return self._finish_read(fd, name, path, fst, prev, pending)
            except OSError as exc:
                self._problem(path, "unreadable", f"read error: {exc.strerror or exc}")
                return None
            finally:
                os.close(fd)
        self._problem(path, "changed", f"kept changing while being read: {last_exc}")
        return None

    def _finish_read(self, fd: int, name: bytes, path: bytes, fst: os.stat_result, prev: Node | None,
                     pending: PendingContent) -> _Child:
        if prev is None or prev.type != NodeType.FILE:
            self.stats.files_new += 1
        else:
            self.stats.files_changed += 1
        self.stats.bytes_read += pending.bytes_read
        self.reporter.advance(nbytes=fst.st_size, items=1)
        node = self._node(name, NodeType.FILE, fst, self._fd_xattrs(fd, path))
        return _Child(node, False, content=pending)

    # ------------------------------------------------------------------ finishing directories
    def _drain(self, *, block: bool) -> None:
        if block:
            self.content.flush_batch()
        while self._queue:
            job = self._queue[0]
            if not block and not all(c.content is None or c.content.done() for c in job.children):
                return
            self._finish_dir(job)
            self._queue.popleft()

    def _resolve(self, child: _Child) -> Node:
        node = child.node
        if child.content is not None:
            refs = child.content.refs()
            pages = child.content.page_ids()
            if pages:
                self.page_blob_ids.update(pages)
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
                self.catalog.put_dir(job.relpath, prev.tree_id, encode_tree(nodes))
            return
        raw = encode_tree(nodes)
        tid, _ = self.store.save_blob(BlobType.TREE, raw)
        job.tree_id = tid
        job.clean = prev is not None and tid == prev.tree_id
        if self.catalog is not None:
            self.catalog.put_dir(job.relpath, tid, raw)


__all__ = ["DeltavaultError", "FileArchiver", "FileBackupOptions", "FileStats", "Problem", "Source"]
