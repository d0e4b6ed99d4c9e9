"""File-level backup engine (the archiver): the walk.

The main thread walks the tree, compares each entry's stat data with the previous run
and reads only what changed (regular.py). Chunks go to a worker pool that hashes,
compresses, encrypts and packs them (the C code there releases the GIL). Directories are
finished in post-order once their files' chunks are stored (dirs.py).

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
import gc
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from deltavault.backup.files.catalog_writer import CatalogWriter
from deltavault.backup.files.dirs import Child, DirJob, TreeWriter
from deltavault.backup.files.nodes import (
    bounded_xattrs,
    dir_clean,
    handle_xattrs,
    make_node,
    same_meta,
)
from deltavault.backup.files.ntfsmeta import PendingStreams, for_source
from deltavault.backup.files.options import Excludes, FileBackupOptions, RunLog, Source, Store
from deltavault.backup.files.previous import PrevDir, PreviousState
from deltavault.backup.files.regular import RegularFiles
from deltavault.chunking.cdc import Chunker
from deltavault.fs.dirfd import DIR_FLAGS, Identity, identity, open_dir_at
from deltavault.fs.paths import display
from deltavault.model.nodes import Node, NodeType
from deltavault.progress import Reporter

# Directory fds the walk holds at most. Deeper than this, the fds of the shallowest
# ancestors (but the source's own) are closed, and each is opened again through ".." of
# its child when the walk climbs back, and must then be the directory it was (dev, ino);
# if it is not (it was moved meanwhile), it is looked up again by name from the source,
# checked level by level. So any depth backs up within a fixed number of open files,
# whatever RLIMIT_NOFILE is (the soft limit is often 1024).
MAX_OPEN_DIRS = 128


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
    orig: bytes = b""  # its original path (Excludes match on it; reports name it)
    children: list[Child] = field(default_factory=list)
    next: int = 0  # index in names of the next entry
    lost: bool = False  # moved away during the run: the rest of it cannot be read
    whole: bool = True  # everything below is kept (not only the paths Source.only names)
    streams: PendingStreams = field(default_factory=list)  # its own named streams being stored (NTFS)


def _join(base: bytes, name: bytes) -> bytes:
    return base + b"/" + name if base else name


class FileArchiver:
    def __init__(self, store: Store, chunker: Chunker, previous: PreviousState, reporter: Reporter,
                 options: FileBackupOptions, *, page_key: bytes | None,
                 catalog: CatalogWriter | None = None) -> None:
        self.store = store
        self.previous = previous
        self.opts = options
        self.log = RunLog(reporter)
        self.problems = self.log.problems
        self.stats = self.log.stats
        self.page_blob_ids: set[bytes] = set()
        workers = options.workers or max(2, min(8, (os.cpu_count() or 2)))
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="dv-blob")
        self.files = RegularFiles(store, previous, self.log, options, self.pool, chunker, workers=workers,
                                  page_key=page_key, catalog=catalog, page_blob_ids=self.page_blob_ids)
        self.trees = TreeWriter(store, previous, catalog, self.page_blob_ids, self.files.content.flush_batch,
                                 self.files.settle_racy)
        self._root_dev = -1
        self._excluded = Excludes(options)
        self._base = b""  # the original path of the source being walked
        self._only: set[bytes] | None = None  # its Source.only
        self._leading: set[bytes] = set()  # the directories that lead to those
        self._skip_ids: set[Identity] = set()
        self._entered: set[int] = set()  # directories entered: dev << 64 | ino

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
            children: list[Child] = []
            for src in sources:
                child = self._source(src, root_prev)
                if child is not None:
                    children.append(child)
            root = DirJob(b"", root_prev, children)
            self.trees.add(root)
            self.trees.drain(block=True)
            # Every file is read; what is left is sending the last packs and the index, which
            # can take a while on a slow link: show it as its own phase, not a full read bar.
            self.log.reporter.finish()
            self.log.reporter.start("upload")
            self.store.flush()
            assert root.tree_id is not None
            return root.tree_id
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.files.content.digester.close()
            gc.set_threshold(*old_gc)

    # ------------------------------------------------------------------ walking
    def _source(self, src: Source, root_prev: PrevDir | None) -> Child | None:
        """One source: looked up by its path (the user's, symlinks in it followed as given),
        then walked by fd."""
        parent, fsname = os.path.split(src.path)
        prev = root_prev.nodes.get(src.name) if root_prev else None
        self._base = src.logical or src.path
        self._only = src.only
        self._leading = {p[:i] for p in src.only or () for i in range(len(p)) if p[i:i + 1] == b"/"}
        self.files.ntfs = for_source(src.path, self.files.content, self.log)
        try:
            pfd = os.open(parent or b"/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self.log.os_problem(src.path, exc)
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
                    self.log.os_problem(src.path, exc)
                    return None
                self._root_dev = st.st_dev
                got = self._entry(pfd, fsname, src.name, src.path, src.name, self._base, root_prev, st)
        finally:
            os.close(pfd)
        if isinstance(got, _Frame):
            got.whole = src.only is None
            return self._walk(got)
        return got

    def _original(self, relpath: bytes) -> bytes:
        """The original path of the entry at ``relpath`` (name/...) of the source being walked."""
        _name, _, rest = relpath.partition(b"/")
        if not rest:
            return self._base
        return self._base + rest if self._base.endswith(b"/") else self._base + b"/" + rest

    def _walk(self, top: _Frame) -> Child | None:
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
            self.log.problem(f.path, "changed", "moved during the backup; its entries after "
                          f"{display(f.names[f.next - 1]) if f.next else 'the start'} were not read")
            return
        f.fd = fd

    def _list_entry(self, f: _Frame, fsname: bytes) -> Child | _Frame | None:
        path = f.path + fsname if f.path.endswith(b"/") else f.path + b"/" + fsname
        relpath = _join(f.relpath, fsname)
        whole = f.whole or relpath in (self._only or ())
        if not whole and relpath not in self._leading:
            return None
        # Built from the directory's own, not from relpath: this runs once per entry.
        orig = f.orig + fsname if f.orig.endswith(b"/") else f.orig + b"/" + fsname
        if self._excluded.patterns and self._excluded(orig):
            return None
        try:
            st = os.stat(fsname, dir_fd=f.fd, follow_symlinks=False)
        except OSError as exc:
            self.log.os_problem(path, exc)
            return None
        if (st.st_dev, st.st_ino) in self._skip_ids or self._excluded.too_large(st):
            return None
        if stat.S_ISREG(st.st_mode):  # most entries: _entry's dispatch skipped
            return self.files.entry(f.fd, fsname, fsname, orig, st, f.prev.nodes.get(fsname) if f.prev else None)
        got = self._entry(f.fd, fsname, fsname, path, relpath, orig, f.prev, st)
        if isinstance(got, _Frame):
            got.whole = whole
        return got

    def _entry(self, dir_fd: int, fsname: bytes, name: bytes, path: bytes, relpath: bytes, orig: bytes,
               pdir: PrevDir | None, st: os.stat_result) -> Child | _Frame | None:
        """The entry ``fsname`` of ``dir_fd``, stored under ``name`` (``orig``: its original
        path); a directory comes back as a frame to walk."""
        prev = pdir.nodes.get(name) if pdir else None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            return self._dir_entry(dir_fd, fsname, name, path, relpath, st, prev)
        if stat.S_ISREG(mode):
            return self.files.entry(dir_fd, fsname, name, orig, st, prev)
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(fsname, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    self.log.problem(path, "changed", "no longer a symlink when read")
                else:
                    self.log.os_problem(path, exc)
                return None
            xattrs = handle_xattrs(self.log, dir_fd, fsname, path, st)
            if xattrs is None:
                return None
            node = make_node(name, NodeType.SYMLINK, st, xattrs, target=target)
            if self.files.ntfs is not None and st.st_dev == self.files.ntfs.dev:
                node = self.files.ntfs.node_at(node, dir_fd, fsname, path, st)
            return Child(node, same_meta(node, prev))
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            t = NodeType.FIFO if stat.S_ISFIFO(mode) else NodeType.CHARDEV if stat.S_ISCHR(mode) else NodeType.BLOCKDEV
            xattrs = handle_xattrs(self.log, dir_fd, fsname, path, st)
            if xattrs is None:
                return None
            node = make_node(name, t, st, xattrs, rdev=st.st_rdev)
            return Child(node, same_meta(node, prev))
        if stat.S_ISSOCK(mode):
            self.log.problem(path, "skipped", "socket: not saved (it is recreated by its server)", partial=False)
            return None
        self.log.problem(path, "skipped", f"unknown file type {stat.S_IFMT(mode):o}", partial=False)
        return None

    # ------------------------------------------------------------------ directories
    def _dir_entry(self, dir_fd: int, fsname: bytes, name: bytes, path: bytes, relpath: bytes,
                   st: os.stat_result, prev: Node | None) -> Child | _Frame | None:
        subprev = self.previous.dir(relpath) if prev is not None and prev.type == NodeType.DIR else None
        try:
            fd = open_dir_at(dir_fd, fsname)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                self.log.problem(path, "changed", "replaced by a non-directory during the backup; not followed")
                return None
            if isinstance(exc, FileNotFoundError):
                self.log.os_problem(path, exc)
                return None
            # Unreadable (EACCES): kept as an empty directory, the run is partial.
            self.log.problem(path, "unreadable", f"directory cannot be listed: {exc.strerror or exc}")
            xattrs = handle_xattrs(self.log, dir_fd, fsname, path, st)
            if xattrs is None:
                return None
            return self._empty_dir(make_node(name, NodeType.DIR, st, xattrs), relpath, subprev, prev)
        try:
            fst = os.fstat(fd)
            if identity(fst) != identity(st):
                self.log.problem(path, "changed", "replaced by another directory during the backup; not read")
                os.close(fd)
                return None
            ntfs = self.files.ntfs
            dstreams: PendingStreams = []
            if ntfs is None or fst.st_dev != ntfs.dev:
                node = make_node(name, NodeType.DIR, fst, bounded_xattrs(self.log, fd, path))
            else:  # (its streams too, as "dir:stream" in its parent, when that is on the same volume)
                named = fsname != b"." and os.fstat(dir_fd).st_dev == fst.st_dev
                node, dstreams = ntfs.node(make_node(name, NodeType.DIR, fst, ntfs.xattrs(fd, path)), fd, path,
                                           dir_fd=dir_fd if named else -1, fsname=fsname, ino=fst.st_ino)
            key = fst.st_dev << 64 | fst.st_ino
            if key in self._entered:
                self.log.problem(path, "skipped", "a directory already backed up at another path in this "
                              "run (a bind mount): stored here as an empty directory", partial=False)
                os.close(fd)
                return self._empty_dir(node, relpath, subprev, prev)
            if self.opts.one_file_system and fst.st_dev != self._root_dev:
                os.close(fd)
                return self._empty_dir(node, relpath, subprev, prev)
            self._entered.add(key)
            names = sorted(os.fsencode(n) for n in os.listdir(fd))
            marker = self._excluded.marker(fd, names)
            if marker is not None:
                names = [marker]  # a cache or marked directory: kept, with only its tag file
        except OSError as exc:
            os.close(fd)
            self.log.problem(path, "unreadable", f"directory cannot be listed: {exc.strerror or exc}")
            return self._empty_dir(make_node(name, NodeType.DIR, st, []), relpath, subprev, prev)
        self.stats.dirs += 1
        return _Frame(fd, identity(fst), fsname, path, relpath, names, subprev, node, dir_clean(node, prev),
                      streams=dstreams, orig=self._original(relpath))

    def _empty_dir(self, node: Node, relpath: bytes, subprev: PrevDir | None, prev: Node | None) -> Child:
        """A directory stored without its entries (unreadable, already seen, another file system)."""
        self.stats.dirs += 1
        job = DirJob(relpath, subprev, [])
        self.trees.add(job)
        return Child(node, dir_clean(node, prev), dirjob=job)

    def _finish_frame(self, f: _Frame) -> Child:
        job = DirJob(f.relpath, f.prev, f.children)
        self.trees.add(job)
        self.trees.drain(block=len(self.trees.queue) > 4096)
        return Child(f.node, f.clean and not f.streams, dirjob=job, streams=f.streams or None)

