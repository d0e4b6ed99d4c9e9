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

Small files are written by the walker in batches whose blobs are read together; large
ones by a thread pool. A directory's metadata is set once everything below it is written
(dirs.py).
"""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from deltavault.errors import NO_SPACE_ERRNOS, CorruptionError, DeltavaultError, NoSpace
from deltavault.fs.dirfd import (
    DIR_FLAGS,
    Replaced,
    identity,
    lstat_at,
    open_dir_at,
    raise_nofile_limit,
)
from deltavault.fs.paths import display, open_target_dir
from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType
from deltavault.objects.store import BlobReader
from deltavault.objects.trees import decode_tree
from deltavault.progress import NullReporter, Reporter
from deltavault.restore.content import verify_fd, write_content
from deltavault.restore.dirs import Dir, Holds
from deltavault.restore.listing import checked_nodes
from deltavault.restore.options import (
    RestoreLog,
    RestoreOptions,
    RestoreStats,
    Selection,
    selection,
)
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
        self.stats = self.log.stats
        self._meta = MetaOptions(owner=options.owner, setuid=options.setuid)
        self.holds = Holds(self.log, self._meta)
        self._pool = BoundedPool(options.workers, IN_FLIGHT, "dv-restore")
        self._lock = threading.Lock()  # guards _fatal
        self._fatal: BaseException | None = None  # the first error that ends the restore
        self._small: list[tuple[Dir, bytes, Node]] = []
        self._small_bytes = 0
        self._found: set[bytes] = set()
        self._links: LinkSources | None = None
        self._futures: list[Future[None]] = []

    # ------------------------------------------------------------------ entry
    def run(self, root_tree: bytes) -> RestoreStats:
        raise_nofile_limit()
        fd = open_target_dir(self.target, "restore target")
        root = Dir(fd, identity(os.fstat(fd)), b"", None, None, fresh=False)
        self._links = LinkSources(fd)
        self.reporter.start("restore")
        try:
            self._walk(root, root_tree, selection(self.opts.include))
            self._flush_small()
        finally:
            for here, _rel, _node in self._small:  # not written: an error ends the run
                self.holds.file_done(here)
            self._pool.shutdown()
            self._links.close()
            os.close(fd)
            self.reporter.finish()
        self._check_fatal()
        for inc in self.opts.include:
            if os.fsencode(inc.strip("/")) not in self._found:
                self.log.problem(os.fsencode(inc), "missing", "not in the snapshot")
        return self.stats

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
    def _listing(self, tree_id: bytes, relpath: bytes) -> list[Node]:
        try:
            nodes = checked_nodes(decode_tree(self.repo.load_blob(tree_id)).nodes, display(relpath))
        except DeltavaultError as exc:
            self.log.problem(relpath or b"/", "corrupt", f"directory listing unreadable: {exc}")
            return []
        return nodes

    def _walk(self, root: Dir, tree_id: bytes, sel: Selection) -> None:
        """Depth first, with our own stack: one frame per directory being listed."""
        frames = [_Frame(root, self._listing(tree_id, b""), sel)]
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
            if child_sel.whole and not f.sel.whole:
                self._found.add(relpath)
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
        if d.files and any(here is d for here, _r, _n in self._small):
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
            d.fd = fd if fd >= 0 else self._reopen_by_name(frames)
            self.holds.opened()
        except OSError as exc:
            d.lost = True
            frames[-1].pos = len(frames[-1].nodes)
            self.log.problem(d.relpath, "write", f"{exc.strerror or exc}: moved or replaced while the restore ran; "
                          "the rest of this directory is not restored and its metadata not set")

    @staticmethod
    def _reopen_by_name(frames: list[_Frame]) -> int:
        start = max(i for i, f in enumerate(frames) if f.dir.fd >= 0)
        fd = os.dup(frames[start].dir.fd)
        try:
            for f in frames[start + 1:]:
                assert f.dir.node is not None
                nfd = open_dir_at(fd, f.dir.node.name)
                os.close(fd)
                fd = nfd
                if identity(os.fstat(fd)) != f.dir.ident:
                    raise Replaced("another directory stands under this name")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _entry(self, parent: Dir, relpath: bytes, node: Node, sel: Selection) -> _Frame | None:
        """Restore one entry of ``parent``; a directory is made and returned as a frame to list."""
        if node.type == NodeType.DIR:
            fd, ident, made = make_dir(parent.fd, node.name)
            self.holds.opened()
            sub = Dir(fd, ident, relpath, node, parent, fresh=made)
            self.holds.hold(parent)
            nodes = self._listing(node.subtree, relpath) if node.subtree is not None else []
            return _Frame(sub, nodes, sel)
        if not sel.whole:
            return None  # a path through a non-directory: nothing selected below
        if not parent.fresh:
            st = lstat_at(parent.fd, node.name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(f"a directory is in the way of {display(node.name)}")
        if node.type == NodeType.FILE:
            self._file(parent, relpath, node)
        elif node.type in _SPECIAL and not self.opts.special:
            self.log.count(skipped_special=1)
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
                self._flush_small()
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

    def _flush_small(self) -> None:
        """Write the batched small files, their blobs read in one pass (load_blobs merges
        neighbours in a pack into one request)."""
        items, self._small, self._small_bytes = self._small, [], 0
        ids = list(dict.fromkeys(r.id for _d, _rel, n in items for r in n.content if isinstance(r, Full)))
        try:
            loaded = dict(self.repo.load_blobs(ids)) if ids else {}
        except DeltavaultError:
            loaded = {}  # a damaged blob: each file loads its own and reports only itself
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
                expect = write_content(self.repo, fd, node, loaded, digests=self.opts.verify)
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
