"""Restore a files snapshot (or chosen paths of it) with its metadata.

The target may hold entries planted by a tampered repository (names are checked to be
single components, duplicates refused) or by another local user who can write there, even
while the restore runs. So the walk never resolves a path: it keeps its own stack of
directory fds, each directory opened by name from its parent's fd with ``O_NOFOLLOW``, and
every entry is made under a temp name, checked, given its metadata through its own fd or
handle and renamed into place (restore/target.py). No path length or depth limit applies
and the Python stack does not grow with depth. Below ``MAX_OPEN_DIRS`` levels the
shallowest directories' fds are let go and opened again through ``..`` on the way back,
where each must be the directory it was (dev, ino).

Small files are written by the walker in batches whose blobs are read together, loaded on
worker threads a few batches ahead; large ones by a thread pool, their segments in
parallel (content.py). A directory's metadata is set once everything below it is written
(dirs.py).
"""

from __future__ import annotations

import gc
import os
import stat
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from deltavault.errors import NO_SPACE_ERRNOS, CorruptionError, DeltavaultError, NoSpace
from deltavault.fs.dirfd import (
    DIR_FLAGS,
    identity,
    lstat_at,
    raise_nofile_limit,
)
from deltavault.fs.paths import display, open_target_dir
from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType
from deltavault.objects.store import BlobReader
from deltavault.objects.trees import decode_tree
from deltavault.progress import NullReporter, Reporter
from deltavault.restore.content import verify_fd, write_content
from deltavault.restore.dirs import Dir, Holds, reopen_by_name
from deltavault.restore.existing import extras, keep_existing, remove, restored_owner
from deltavault.restore.listing import checked_nodes
from deltavault.restore.ntfsmeta import NtfsTarget
from deltavault.restore.options import RestoreLog, RestoreOptions, RestoreStats
from deltavault.restore.select import Excluded, Selection, plan, selected_totals
from deltavault.restore.target import (
    LinkSources,
    MetaOptions,
    apply_node_meta,
    install,
    make_dir,
    place_special,
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
# Directory fds the walk keeps open at most (besides those with files in flight), so any
# depth restores within a small RLIMIT_NOFILE.
MAX_OPEN_DIRS = 64
_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SPECIAL = (NodeType.FIFO, NodeType.CHARDEV, NodeType.BLOCKDEV)


@dataclass
class _Frame:
    dir: Dir
    nodes: list[Node]
    sel: Selection
    pos: int = 0


class FileRestorer:
    def __init__(self, repo: BlobReader, target: str | bytes, options: RestoreOptions,
                 reporter: Reporter | None = None) -> None:
        self.repo = repo
        self.target = os.fsencode(target)
        self.opts = options
        self.reporter = reporter or NullReporter()
        self.log = RestoreLog(self.reporter)
        self.problems = self.log.problems
        self.warnings = self.log.warnings  # said once, not problems (NTFS metadata a target cannot keep)
        self.stats = self.log.stats
        self._meta = MetaOptions(owner=options.owner, setuid=options.setuid)
        self.holds = Holds(self.log, self._meta)
        self._pool = BoundedPool(options.workers, IN_FLIGHT, "dv-restore")
        # Segments of large files (restore/content.py); its own threads, since a file's task
        # on _pool waits for them.
        self._segments = ThreadPoolExecutor(max(2, options.workers), thread_name_prefix="dv-restore-seg")
        self._lock = threading.Lock()  # guards _fatal
        self._fatal: BaseException | None = None  # the first error that ends the restore
        self._small: list[tuple[Dir, bytes, Node]] = []
        self._small_bytes = 0
        # Batches of small files whose blobs are being loaded on _segments, oldest first.
        self._loading: deque[tuple[list[tuple[Dir, bytes, Node]], Future[dict[bytes, bytes]]]] = deque()
        self._excluded = Excluded(options.exclude, options.paths)
        self._links: LinkSources | None = None
        self._futures: list[Future[None]] = []
        self._ntfs: NtfsTarget | None = None  # set by run, once the target is open

    # ------------------------------------------------------------------ entry
    def run(self, root_tree: bytes) -> RestoreStats:
        raise_nofile_limit()
        fd = open_target_dir(self.target, "restore target")
        root = Dir(fd, identity(os.fstat(fd)), b"", None, None, fresh=False)
        self._links = LinkSources(fd)
        ntfs = NtfsTarget(fd, self.repo, self.log, verify=self.opts.verify)
        self._ntfs = ntfs
        self._meta = self.holds.meta = MetaOptions(owner=self.opts.owner, setuid=self.opts.setuid, last=ntfs.meta)
        self.reporter.start("restore")
        # As in backup (archiver.py): the walk allocates many short-lived, acyclic objects
        # (nodes, listings, blobs), and the cyclic collector scanning them and everything
        # loaded before (the index) took ~0.25 s of a 2 s restore (py-spy). Rarely, not never.
        old_gc = gc.get_threshold()
        gc.set_threshold(200_000, 50, 50)
        gc.freeze()
        try:
            sel, unused = plan(self.repo, root_tree, self.opts.include, self.opts.paths)
            for pattern in unused:
                self.log.problem(pattern.encode("utf-8", "surrogateescape"), "missing",
                                 "matches nothing in the snapshot")
            if self.reporter.wants_totals:
                threading.Thread(target=self._totals, args=(root_tree, sel), name="dv-totals", daemon=True).start()
            self._walk(root, root_tree, sel)
            self._flush_small()
            self._drain()
            lost = ntfs.summary()
            if lost is not None:
                self.log.count(ntfs_not_kept=sum(ntfs.lost.values()))
                self.log.warn(b"", lost)
        finally:
            for batch in [self._small, *(items for items, _f in self._loading)]:
                for here, _rel, _node in batch:  # not written: an error ends the run
                    self.holds.file_done(here)
            self._small, self._loading = [], deque()
            self._pool.shutdown()
            self._segments.shutdown()
            self._links.close()
            os.close(fd)
            gc.unfreeze()
            gc.set_threshold(*old_gc)
            self.reporter.finish()
        self._check_fatal()
        return self.stats

    def _totals(self, root_tree: bytes, sel: Selection) -> None:
        try:
            nbytes, files = selected_totals(self.repo, root_tree, sel, self._excluded)
        except DeltavaultError:
            return  # the restore reports damage; the bar just has no total
        self.reporter.set_totals(total_bytes=nbytes, total_items=files)

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    def _drain(self) -> None:
        """Finish every file queued or being written: the directories waiting for them
        get their metadata and let go of their fds."""
        self._flush_small()
        for fut in self._futures:
            if not fut.cancelled():
                fut.result()
        self._futures = []

    # ------------------------------------------------------------------ tree walk
    def _listing(self, tree_id: bytes, relpath: bytes, sel: Selection) -> list[Node] | None:
        """A directory's entries, checked; None (reported) when they cannot be read."""
        try:
            nodes = checked_nodes(sel.listing if sel.listing is not None
                                  else decode_tree(self.repo.load_blob(tree_id)).nodes, display(relpath))
        except DeltavaultError as exc:
            self.log.problem(relpath or b"/", "corrupt", f"directory listing unreadable: {exc}")
            return None
        return nodes

    def _delete_extras(self, d: Dir, nodes: list[Node] | None, sel: Selection) -> None:
        """--delete: what the target directory ``d`` holds and the snapshot does not goes,
        when the directory is restored whole and its listing could be read."""
        if not self.opts.delete or not sel.whole or nodes is None or d.fresh:
            return
        base = d.relpath + b"/" if d.relpath else b""
        for name in extras(d.fd, nodes, lambda n: self._excluded(base + n)):
            try:
                remove(d.fd, name)
                self.log.count(deleted=1)
            except OSError as exc:
                self.log.problem(base + name, "delete", exc.strerror or str(exc))

    def _walk(self, root: Dir, tree_id: bytes, sel: Selection) -> None:
        """Depth first, with our own stack: one frame per directory being listed."""
        nodes = self._listing(tree_id, b"", sel)
        self._delete_extras(root, nodes, sel)
        frames = [_Frame(root, nodes or [], sel)]
        while frames:
            self._check_fatal()
            f = frames[-1]
            if f.pos == len(f.nodes):
                frames.pop()
                if self.holds.open_dirs > 2 * MAX_OPEN_DIRS:
                    # Directories left behind that wait for files below them hold their fds.
                    self._drain()
                if frames and frames[-1].dir.fd < 0 and not frames[-1].dir.lost:
                    self._reopen(frames, f.dir)
                self.holds.release(f.dir)  # the walker's hold
                continue
            node = f.nodes[f.pos]
            f.pos += 1
            child_sel = f.sel if f.sel.whole else f.sel.children.get(node.name)
            if child_sel is None:
                continue
            relpath = f.dir.relpath + b"/" + node.name if f.dir.relpath else node.name
            if self._excluded(relpath):
                continue
            try:
                sub = self._entry(f.dir, relpath, node, child_sel)
            except NoSpace:
                raise
            except OSError as exc:
                if exc.errno in NO_SPACE_ERRNOS:
                    raise NoSpace(f"restore target is full while writing {display(relpath)}") from exc
                self.log.problem(relpath, "write", exc.strerror or str(exc))
                continue
            if sub is not None:
                frames.append(sub)
                self._let_go(frames)

    def _let_go(self, frames: list[_Frame]) -> None:
        """Close the fd of the directory MAX_OPEN_DIRS levels up (never the target root's),
        unless files are still being written in it."""
        i = len(frames) - 1 - MAX_OPEN_DIRS
        if i < 1:
            return
        d = frames[i].dir
        if d.fd < 0:
            return
        if d.files and any(here is d for batch in [self._small, *(items for items, _f in self._loading)]
                           for here, _r, _n in batch):
            self._flush_small()
        if self.holds.writing(d):
            return  # a worker writes there; it is closed when the walk comes back
        self.holds.close(d)

    def _reopen(self, frames: list[_Frame], child: Dir) -> None:
        """Open again the directory the walk climbs back into, through ``..`` of the one it
        leaves; it must be the directory it was. If it was moved meanwhile, it is looked up
        by name from the nearest open ancestor, each level checked; failing that, the rest of
        it is not restored."""
        d = frames[-1].dir
        try:
            fd = -1
            if child.fd >= 0:
                fd = os.open(b"..", DIR_FLAGS, dir_fd=child.fd)
                if identity(os.fstat(fd)) != d.ident:
                    os.close(fd)
                    fd = -1
            d.fd = fd if fd >= 0 else reopen_by_name([f.dir for f in frames])
            self.holds.opened()
        except OSError as exc:
            d.lost = True
            frames[-1].pos = len(frames[-1].nodes)
            self.log.problem(d.relpath, "write", f"{exc.strerror or exc}: moved or replaced while the restore ran; "
                          "the rest of this directory is not restored and its metadata not set")

    def _entry(self, parent: Dir, relpath: bytes, node: Node, sel: Selection) -> _Frame | None:
        """Restore one entry of ``parent``; a directory is made and returned as a frame to list."""
        if node.type == NodeType.DIR:
            fd, ident, made = make_dir(parent.fd, node.name)
            self.holds.opened()
            sub = Dir(fd, ident, relpath, node, parent, fresh=made)
            if self._ntfs is not None:  # its named streams ("dir:stream"), before its times are set, last
                self._ntfs.streams(parent.fd, node.name, fd, node, relpath)
            self.holds.hold(parent)
            nodes = self._listing(node.subtree, relpath, sel) if node.subtree is not None else []
            self._delete_extras(sub, nodes, sel)
            return _Frame(sub, nodes or [], sel)
        if not sel.whole:
            return None  # a path through a non-directory: nothing selected below
        if not parent.fresh:
            st = lstat_at(parent.fd, node.name)
            if keep_existing(self.opts.overwrite, st, node, restored_owner(node, self.opts.owner)):
                self.log.count(skipped=1)
                self.reporter.advance(nbytes=node.size, items=1)
                return None
            if st is not None and stat.S_ISDIR(st.st_mode):
                if not self.opts.delete:
                    raise IsADirectoryError(f"a directory is in the way of {display(node.name)} (--delete "
                                            "removes it)")
                remove(parent.fd, node.name)
                self.log.count(deleted=1)
        if node.type == NodeType.FILE:
            self._file(parent, relpath, node)
        elif node.type in _SPECIAL and not self.opts.special:
            self.log.count(skipped_special=1)
        elif self._ntfs is not None and self._ntfs.is_reparse_point(node):
            for m in self._ntfs.place_reparse_point(parent.fd, node, shared=not parent.fresh):
                self.log.problem(relpath, "metadata", m)
            self.log.count(special=1)
        else:
            for m in place_special(parent.fd, node, self._meta, shared=not parent.fresh):
                self.log.problem(relpath, "metadata", m)
            self.log.count(special=1)
        return None

    # ------------------------------------------------------------------ files
    def _file(self, parent: Dir, relpath: bytes, node: Node) -> None:
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
        """Hand the batch of small files being gathered to _segments to load its blobs, in one
        pass (load_blobs merges neighbours in a pack into one request), while the walker
        writes the batches before it: decryption, decompression and hashing of the tree's
        small files had been on the walker's thread, after its file system calls."""
        items, self._small, self._small_bytes = self._small, [], 0
        if not items:
            return
        ids = list(dict.fromkeys(r.id for _d, _rel, n in items for r in n.content if isinstance(r, Full)))
        try:
            fut = self._segments.submit(self._load_blobs, ids)
        except BaseException:
            for here, _rel, _node in items:
                self.holds.file_done(here)
            raise
        self._loading.append((items, fut))

    def _load_blobs(self, ids: list[bytes]) -> dict[bytes, bytes]:
        return dict(self.repo.load_blobs(ids)) if ids else {}

    def _flush_small(self) -> None:
        """Write every small file gathered or being loaded."""
        self._load_small()
        while self._loading:
            self._write_small(*self._loading.popleft())

    def _write_small(self, items: list[tuple[Dir, bytes, Node]], fut: Future[dict[bytes, bytes]]) -> None:
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
        fd = os.open(tmp, _FILE_FLAGS, 0o600, dir_fd=parent.fd)
        try:
            try:
                expect = write_content(self.repo, fd, node, loaded, digests=self.opts.verify,
                                       pool=self._segments, window=max(2, self.opts.workers) + 1, fresh=True)
                if self._ntfs is not None:
                    self._ntfs.streams(parent.fd, tmp, fd, node, relpath)
                for m in apply_node_meta(fd, node, self._meta):
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
        self.reporter.advance(nbytes=node.size, items=1, current=display(relpath))
