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
(its mode may forbid writes, and every entry made in it changes its times).
"""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from deltavault.errors import NO_SPACE_ERRNOS, CorruptionError, DeltavaultError, NoSpace
from deltavault.fs.dirfd import (
    DIR_FLAGS,
    Identity,
    Replaced,
    identity,
    lstat_at,
    open_dir_at,
    raise_nofile_limit,
)
from deltavault.fs.paths import check_name, display, open_target_dir
from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType
from deltavault.objects.store import BlobReader
from deltavault.objects.trees import decode_tree
from deltavault.progress import NullReporter, Reporter
from deltavault.restore.content import verify_fd, write_content
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

__all__ = ["FileRestorer", "RestoreOptions", "RestoreProblem", "RestoreStats"]


@dataclass
class RestoreOptions:
    include: list[str] = field(default_factory=list)  # paths inside the snapshot; empty = all
    verify: bool = False
    owner: bool = True  # chown (effective only as root)
    workers: int = 3
    special: bool = True  # False (--no-special): device nodes and FIFOs are skipped
    setuid: bool = True  # False (--no-setuid): setuid and setgid bits of files are cleared


@dataclass
class RestoreProblem:
    path: str
    kind: str  # corrupt | write | metadata | verify | missing
    message: str


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    links: int = 0
    special: int = 0
    skipped_special: int = 0
    bytes_written: int = 0
    bytes_verified: int = 0


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


class _Dir:
    """A directory of the target being restored. ``left`` counts the walker's hold (released
    when its listing is done), its files being written and its subdirectories not yet
    finished; the last release sets its metadata. ``fd`` is -1 while the walk is far below
    (or once it was found moved: ``lost``)."""

    __slots__ = ("fd", "files", "fresh", "ident", "left", "lost", "node", "parent", "relpath")

    def __init__(self, fd: int, ident: Identity, relpath: bytes, node: Node | None,
                 parent: _Dir | None, fresh: bool) -> None:
        self.fd, self.ident, self.relpath, self.node, self.parent = fd, ident, relpath, node, parent
        self.fresh = fresh  # made 0700 by this run: nobody else can have put anything in it
        self.left = 1
        self.files = 0  # files queued or being written in it (its fd must stay open)
        self.lost = False


@dataclass
class _Frame:
    dir: _Dir
    nodes: list[Node]
    sel: _Selection
    pos: int = 0


@dataclass
class _Selection:
    whole: bool  # restore everything below
    children: dict[bytes, _Selection] = field(default_factory=dict)


def _selection(include: list[str]) -> _Selection:
    if not include:
        return _Selection(True)
    root = _Selection(False)
    for inc in include:
        parts = [os.fsencode(p) for p in inc.strip("/").split("/") if p and p != "."]
        cur = root
        for p in parts:
            cur = cur.children.setdefault(p, _Selection(False))
        cur.whole = True
    return root


class FileRestorer:
    def __init__(self, repo: BlobReader, target: str | bytes, options: RestoreOptions,
                 reporter: Reporter | None = None) -> None:
        self.repo = repo
        self.target = os.fsencode(target)
        self.opts = options
        self.reporter = reporter or NullReporter()
        self.problems: list[RestoreProblem] = []
        self.stats = RestoreStats()
        self._meta = MetaOptions(owner=options.owner, setuid=options.setuid)
        self._pool = BoundedPool(options.workers, IN_FLIGHT, "dv-restore")
        self._lock = threading.Lock()
        self._fatal: BaseException | None = None  # the first error that ends the restore
        self._small: list[tuple[_Dir, bytes, Node]] = []
        self._small_bytes = 0
        self._found: set[bytes] = set()
        self._links: LinkSources | None = None
        self._open_dirs = 0  # directory fds held, for the bound on open files
        self._futures: list[Future[None]] = []

    def _problem(self, path: bytes, kind: str, message: str) -> None:
        p = RestoreProblem(display(path), kind, message)
        with self._lock:
            self.problems.append(p)
        self.reporter.problem(p.path, kind, message)

    def _count(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    # ------------------------------------------------------------------ entry
    def run(self, root_tree: bytes) -> RestoreStats:
        raise_nofile_limit()
        fd = open_target_dir(self.target, "restore target")
        root = _Dir(fd, identity(os.fstat(fd)), b"", None, None, fresh=False)
        self._links = LinkSources(fd)
        self.reporter.start("restore")
        try:
            self._walk(root, root_tree, _selection(self.opts.include))
            self._flush_small()
        finally:
            for here, _rel, _node in self._small:  # not written: an error ends the run
                self._file_done(here)
            self._pool.shutdown()
            self._links.close()
            os.close(fd)
            self.reporter.finish()
        self._check_fatal()
        for inc in self.opts.include:
            if os.fsencode(inc.strip("/")) not in self._found:
                self._problem(os.fsencode(inc), "missing", "not in the snapshot")
        return self.stats

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    # ------------------------------------------------------------------ holds
    def _hold(self, d: _Dir, *, file: bool = False) -> None:
        """One more thing below ``d`` to finish before its metadata is applied."""
        with self._lock:
            d.left += 1
            d.files += file

    def _file_done(self, d: _Dir) -> None:
        with self._lock:
            d.files -= 1
        self._release(d)

    def _release(self, d: _Dir | None) -> None:
        """One thing below ``d`` is finished; the last one applies its metadata, then
        counts for its parent. The target root's own metadata is the user's."""
        while d is not None:
            with self._lock:
                d.left -= 1
                if d.left:
                    return
            if d.node is None:
                return
            if d.fd >= 0:
                try:
                    for m in apply_node_meta(d.fd, d.node, self._meta):
                        self._problem(d.relpath, "metadata", m)
                finally:
                    self._close_dir(d)
                self._count(dirs=1)
            d = d.parent

    def _close_dir(self, d: _Dir) -> None:
        fd, d.fd = d.fd, -1
        os.close(fd)
        with self._lock:
            self._open_dirs -= 1

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
            nodes = decode_tree(self.repo.load_blob(tree_id)).nodes
            seen: set[bytes] = set()
            for n in nodes:
                check_name(n.name)
                if n.name in seen:
                    raise CorruptionError(f"tree {display(relpath) or '/'} lists {display(n.name)} twice")
                seen.add(n.name)
        except DeltavaultError as exc:
            self._problem(relpath or b"/", "corrupt", f"directory listing unreadable: {exc}")
            return []
        return nodes

    def _walk(self, root: _Dir, tree_id: bytes, sel: _Selection) -> None:
        """Depth first, with our own stack: one frame per directory being listed."""
        frames = [_Frame(root, self._listing(tree_id, b""), sel)]
        while frames:
            self._check_fatal()
            f = frames[-1]
            if f.pos == len(f.nodes):
                frames.pop()
                if self._open_dirs > 2 * MAX_OPEN_DIRS:
                    # Directories left behind that wait for files below them hold their fds.
                    self._drain()
                if frames and frames[-1].dir.fd < 0 and not frames[-1].dir.lost:
                    self._reopen(frames, f.dir)
                self._release(f.dir)  # the walker's hold
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
                self._problem(relpath, "write", exc.strerror or str(exc))
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
        with self._lock:
            if d.files:
                return  # a worker writes there; it is closed when the walk comes back
        self._close_dir(d)

    def _reopen(self, frames: list[_Frame], child: _Dir) -> None:
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
            with self._lock:
                self._open_dirs += 1
        except OSError as exc:
            d.lost = True
            frames[-1].pos = len(frames[-1].nodes)
            self._problem(d.relpath, "write", f"{exc.strerror or exc}: moved or replaced while the restore ran; "
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

    def _entry(self, parent: _Dir, relpath: bytes, node: Node, sel: _Selection) -> _Frame | None:
        """Restore one entry of ``parent``; a directory is made and returned as a frame to list."""
        if node.type == NodeType.DIR:
            fd, ident, made = make_dir(parent.fd, node.name)
            with self._lock:
                self._open_dirs += 1
            sub = _Dir(fd, ident, relpath, node, parent, fresh=made)
            self._hold(parent)
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
            self._count(skipped_special=1)
        else:
            for m in place_special(parent.fd, node, self._meta, shared=not parent.fresh):
                self._problem(relpath, "metadata", m)
            self._count(special=1)
        return None

    # ------------------------------------------------------------------ files
    def _file(self, parent: _Dir, relpath: bytes, node: Node) -> None:
        key = (node.dev, node.inode) if node.links > 1 else None
        assert self._links is not None
        if key is not None and key in self._links:
            self._links.link(key, parent.fd, node.name, shared=not parent.fresh)
            self._count(links=1)
            return
        self._hold(parent, file=True)
        if key is not None:
            # Written now, by the walker: the next name of it may follow at once.
            self._links.reserve(key)
            try:
                self._write_guarded(parent, relpath, node, None, key)
            finally:
                self._file_done(parent)
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
            self._file_done(parent)
            raise
        if len(self._futures) > 4 * IN_FLIGHT:
            self._futures = [f for f in self._futures if not f.done()]

    def _file_task(self, parent: _Dir, relpath: bytes, node: Node) -> None:
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
            self._file_done(parent)

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
                    self._file_done(later)
                raise
            finally:
                self._file_done(here)

    def _write_guarded(self, parent: _Dir, relpath: bytes, node: Node, loaded: dict[bytes, bytes] | None,
                       key: tuple[int, int] | None) -> None:
        try:
            self._write_file(parent, relpath, node, loaded or {}, key)
        except NoSpace:
            raise
        except CorruptionError as exc:
            self._problem(relpath, "corrupt", str(exc))
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                raise NoSpace(f"restore target is full while writing {display(relpath)}") from exc
            self._problem(relpath, "write", exc.strerror or str(exc))

    def _write_file(self, parent: _Dir, relpath: bytes, node: Node, loaded: dict[bytes, bytes],
                    key: tuple[int, int] | None) -> None:
        tmp = temp_name(node.name)
        fd = os.open(tmp, _FILE_FLAGS, 0o600, dir_fd=parent.fd)
        try:
            try:
                expect = write_content(self.repo, fd, node, loaded, digests=self.opts.verify)
                for m in apply_node_meta(fd, node, self._meta):
                    self._problem(relpath, "metadata", m)
                if self.opts.verify:
                    n, bad = verify_fd(self.repo, fd, node.size, expect)
                    self._count(bytes_verified=n)
                    if bad:
                        self._problem(relpath, "verify", "read back differs from what was written: "
                                      + "; ".join(bad[:5]))
            except BaseException:
                unlink_quiet(parent.fd, tmp)
                raise
            install(parent.fd, tmp, node.name, None if parent.fresh else identity(os.fstat(fd)))
            if key is not None and self._links is not None:
                self._links.add(key, relpath, fd)
        finally:
            os.close(fd)
        self._count(files=1, bytes_written=node.size)
        self.reporter.advance(nbytes=node.size, items=1, current=display(relpath))
