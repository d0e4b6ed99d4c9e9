"""The sync engine: mirror SRC into DST.

The main thread walks SRC, creates directories, symlinks and special files, deletes
extras (--delete) and hands regular files to a pool of copy threads. A file is written
under a temp name and renamed into place, so an interrupted run never leaves a half-written
file under a real name. Hard links are made once every file is in place, and directory
metadata last, deepest first (writing into a directory changes its mtime).

Every operation on DST is relative to an open directory fd and follows no symlink.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import stat
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import blake3

from deltavault.errors import NO_SPACE_ERRNOS, NoSpace, UsageError
from deltavault.fs.clone import pread_full, reflink
from deltavault.fs.paths import display, open_target_dir, proc_path
from deltavault.progress import NullReporter, Reporter
from deltavault.sync.copy import (
    BufferPool,
    Cancelled,
    SourceChanged,
    SourceReadError,
    copy_data,
    read_source,
)
from deltavault.sync.delta import PAGE, page_delta
from deltavault.sync.dest import (
    OpenFailed,
    changed_since,
    delete_extras,
    fix_meta,
    hard_link,
    open_source,
    place_special,
    unlink_quiet,
    verify_written,
)
from deltavault.sync.filters import Filter
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.options import SyncOptions
from deltavault.sync.report import SyncLog, SyncProblem, SyncStats
from deltavault.sync.shard import ShardPool, ShardResult, shard_depth
from deltavault.sync.tree import (
    DIR_FLAGS,
    join,
    lstat_at,
    open_dir,
    remove_entry,
    temp_name,
)
from deltavault.workers import BoundedPool

THREAD_MIN = 1024 * 1024  # files from this size on are copied by the thread pool
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Staged:
    """A file's new content, written and waiting to be renamed into place."""

    tmp: bytes | None  # None: written in place (--inplace)
    action: str  # new | update | delta
    written: int
    digest: bytes | None = None
    reflinked: bool = False


@dataclass(eq=False)
class _Dir:
    """A directory being synced. Its fds stay open until its last file is in place; then
    its metadata is applied (writing into a directory changes its mtime) and it is closed."""

    relpath: bytes
    st: os.stat_result
    xattrs: list[tuple[bytes, bytes]] | None
    sfd: int
    dfd: int
    parent: _Dir | None
    fresh: bool  # created by this run: DST holds nothing here yet
    pending: int = 1  # the walker's hold, + unfinished files and subdirectories
    deferred: bool = False  # hard links will be made here: metadata after them
    dropped: bool = False  # removed (--skip-empty-dirs): no metadata


@dataclass
class _Deferred:
    relpath: bytes
    st: os.stat_result
    xattrs: list[tuple[bytes, bytes]] | None


@dataclass
class SyncResult:
    stats: SyncStats
    problems: list[SyncProblem] = field(default_factory=list)
    stopped: bool = False  # --stop-on-error ended the run early
    workers: int = 0  # worker processes that synced subtrees (0: all in this process)
    wire: tuple[int, int] | None = None  # push sync: bytes sent and received over ssh


class Syncer:
    def __init__(self, src: str | bytes, dst: str | bytes, options: SyncOptions,
                 reporter: Reporter | None = None, log: SyncLog | None = None, *,
                 cancel: Any = None, processes: int | None = None, buffers: BufferPool | None = None) -> None:
        self.src = os.fsencode(src)
        self.dst = os.fsencode(dst)
        self.opts = options
        self.reporter = reporter or NullReporter()
        self.log = log
        self.stats = SyncStats()
        self.problems: list[SyncProblem] = []
        self.filter = Filter(options.excludes, options.includes, default_excludes=options.default_excludes)
        self.meta = MetaPolicy(options)
        bufsize = max(PAGE, -(-options.bufsize // PAGE) * PAGE)
        self.buffers = buffers if buffers is not None else BufferPool(bufsize)
        self._threads = max(1, options.threads)
        self._ids = (os.geteuid(), os.getegid())
        self._umask = os.umask(0o022)
        os.umask(self._umask)
        self._lock = threading.Lock()
        # Shared with worker processes when there are any (a multiprocessing Event).
        self._cancel: Any = cancel if cancel is not None else threading.Event()
        self._processes = options.processes if processes is None else processes
        self._shards: ShardPool | None = None
        self._shard_depth = -1
        self.workers = 0
        self._relinked_dirs: set[bytes] = set()
        self._fatal: NoSpace | None = None
        self._stopped = False
        self._jobs: list[Future[None]] = []
        self._open: set[_Dir] = set()
        self._deferred: list[_Deferred] = []
        self._temps: set[bytes] = set()  # temp files that may exist: removed if the run is interrupted
        self._first_link: dict[tuple[int, int], bytes] = {}
        self._links: list[tuple[bytes, bytes]] = []
        # What this run did to hard-linked files, for merging workers' counts.
        self.link_copies: dict[bytes, str] = {}  # relpath -> the stats counter it went to
        self.links_made: set[bytes] = set()

    # ------------------------------------------------------------------ entry
    @property
    def stopped(self) -> bool:
        return self._stopped

    def partial(self) -> SyncResult:
        """What was done before a run failed."""
        return SyncResult(self.stats, self.problems, self._stopped, self.workers)

    def run(self) -> SyncResult:
        self._check_paths()
        os.close(open_target_dir(self.dst, "destination"))
        self._run(b"", fresh=False, included=not self.filter.has_includes, top=True)
        if self._fatal is not None:
            raise self._fatal
        return SyncResult(self.stats, self.problems, self._stopped, self.workers)

    def run_subtree(self, relpath: bytes, *, fresh: bool, included: bool) -> int:
        """Sync SRC/relpath into DST/relpath, which exists, leaving that directory's own
        metadata to the caller. Returns how many entries it kept."""
        kept = self._run(relpath, fresh=fresh, included=included, top=False)
        if self._fatal is not None:
            raise self._fatal
        return kept

    def _run(self, relpath: bytes, *, fresh: bool, included: bool, top: bool) -> int:
        sroot = os.open(self.src, DIR_FLAGS & ~os.O_NOFOLLOW)
        try:
            droot = os.open(self.dst, DIR_FLAGS & ~os.O_NOFOLLOW)
        except BaseException:
            os.close(sroot)
            raise
        try:
            sfd = open_dir(sroot, relpath)
            try:
                dfd = open_dir(droot, relpath)
            except BaseException:
                os.close(sfd)
                raise
        except OSError as exc:
            os.close(sroot)
            os.close(droot)
            self._problem(relpath or b".", "unreadable", exc.strerror or str(exc))
            return 1
        os.close(sroot)
        if top and self._processes > 1:
            depth = shard_depth(sfd, self._processes, self.filter.excluded)
            if depth is not None:
                # Forked now, while this process has a single thread.
                self._cancel = mp.get_context("fork").Event()
                self._shards = ShardPool(self._processes, self.src, self.dst, self.opts, self.log,
                                         self._cancel, self.reporter)
                self._shard_depth = depth
                self.workers = self._processes
        pool = BoundedPool(self._threads, self._threads * 2, "dv-sync")
        if top:
            self.reporter.start("sync")
        old_limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old_limit, 20000))
        kept = 1
        try:
            self._pool = pool
            root = self._enter(None, relpath, os.fstat(sfd), sfd, dfd, fresh=fresh)
            root.dropped = not top  # the caller owns the subtree root's metadata
            try:
                kept = self._sync_dir(root, included=included)
            finally:
                self._release(root)
            self._wait_jobs()
            if self._shards is not None:
                self._shards.close()
                self._shards = None
            if not self._cancel.is_set():
                self._make_links(droot)
                self._finish_deferred(droot)
        except BaseException:
            self._cancel.set()  # copy threads stop at their next buffer and remove temp files
            pool.shutdown(cancel_futures=True)
            if self._shards is not None:
                self._shards.close()  # workers see the event, clean up and return
                self._shards = None
            self._remove_temps()
            raise
        finally:
            pool.shutdown(cancel_futures=True)
            for d in list(self._open):  # left open by an interruption
                for fd in (d.sfd, d.dfd):
                    if fd >= 0:
                        os.close(fd)
            if self._cancel.is_set():
                self._remove_temps()
            os.close(droot)
            sys.setrecursionlimit(old_limit)
            if top:
                self.reporter.finish()
        return kept

    def hardlink_groups(self) -> dict[tuple[int, int], list[bytes]]:
        """Source inode -> DST paths, the copied one first (for merging across workers)."""
        groups = {k: [v] for k, v in self._first_link.items()}
        firsts = {v: k for k, v in self._first_link.items()}
        for rel, first in self._links:
            groups[firsts[first]].append(rel)
        return groups

    def _temp(self, relpath: bytes, name: bytes) -> bytes:
        """A temp name next to relpath, registered before it is created so that an interrupt
        at any point (Ctrl-C lands between any two statements) cannot leave it behind."""
        tmp = temp_name(name)
        with self._lock:
            self._temps.add(os.path.join(self.dst, os.path.dirname(relpath), tmp))
        return tmp

    def _untemp(self, relpath: bytes, tmp: bytes) -> None:
        with self._lock:
            self._temps.discard(os.path.join(self.dst, os.path.dirname(relpath), tmp))

    def _remove_temps(self) -> None:
        with self._lock:
            temps, self._temps = self._temps, set()
        for path in temps:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _check_paths(self) -> None:
        src = os.path.realpath(self.src)
        dst = os.path.realpath(self.dst)
        if not os.path.isdir(src):
            raise UsageError(f"source {display(self.src)} is not a directory")
        if src == dst or dst.startswith(src.rstrip(b"/") + b"/") or src.startswith(dst.rstrip(b"/") + b"/"):
            raise UsageError(f"source {display(self.src)} and destination {display(self.dst)} overlap")

    # ------------------------------------------------------------------ outcomes
    def _problem(self, relpath: bytes, kind: str, message: str, *, size: int = 0) -> None:
        p = SyncProblem(display(relpath), kind, message)
        with self._lock:
            self.problems.append(p)
        self.reporter.problem(p.path, kind, message)
        if self.log is not None:
            self.log.write("error", size, relpath, error=f"{kind}: {message}")
        if self.opts.stop_on_error and kind != "skipped":
            self._stopped = True
            self._cancel.set()

    def _done(self, action: str, relpath: bytes, size: int, *, written: int = 0,
              digest: bytes | None = None, note: str | None = None) -> None:
        if self.log is not None:
            self.log.write(action, size, relpath, written=written, digest=digest, error=note)

    def _count(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _os_problem(self, relpath: bytes, exc: OSError, kind: str = "write") -> None:
        if exc.errno in NO_SPACE_ERRNOS:
            self._no_space(relpath)
        else:
            self._problem(relpath, kind, exc.strerror or str(exc))

    def _no_space(self, relpath: bytes) -> None:
        with self._lock:
            if self._fatal is None:
                self._fatal = NoSpace(f"the destination {display(self.dst)} is full "
                                      f"(while writing {display(relpath)}); files already synced are complete")
        self._problem(relpath, "write", "no space left on the destination")
        self._cancel.set()

    # ------------------------------------------------------------------ walking
    def _dir_xattrs(self, fd: int, relpath: bytes) -> list[tuple[bytes, bytes]] | None:
        try:
            return self.meta.source_xattrs(fd=fd)
        except OSError as exc:
            self._problem(relpath or b".", "metadata", f"extended attributes unreadable: {exc.strerror}")
            return None

    def _enter(self, parent: _Dir | None, relpath: bytes, st: os.stat_result, sfd: int, dfd: int,
               *, fresh: bool) -> _Dir:
        d = _Dir(relpath, st, self._dir_xattrs(sfd, relpath), sfd, dfd, parent, fresh)
        with self._lock:
            self._open.add(d)
            if parent is not None:
                parent.pending += 1
        return d

    def _release(self, d: _Dir) -> None:
        """One piece of d's work is done; the last one finishes d, then its parent."""
        while True:
            with self._lock:
                d.pending -= 1
                if d.pending:
                    return
                self._open.discard(d)
            self._finish_dir(d)
            if d.parent is None:
                return
            d = d.parent

    def _finish_dir(self, d: _Dir) -> None:
        try:
            if d.dropped:
                return
            if d.deferred:
                with self._lock:
                    self._deferred.append(_Deferred(d.relpath, d.st, d.xattrs))
                return
            self._apply_dir_meta(d.dfd, d.relpath, d.st, d.xattrs)
        finally:
            for fd in (d.sfd, d.dfd):
                if fd >= 0:
                    os.close(fd)

    def _apply_dir_meta(self, fd: int, relpath: bytes, st: os.stat_result,
                        xattrs: list[tuple[bytes, bytes]] | None) -> None:
        for m in self.meta.apply_fd(fd, st, xattrs):
            self._problem(relpath or b".", "metadata", m)

    def _sync_dir(self, d: _Dir, *, included: bool) -> int:
        """Sync one directory's entries; returns how many it kept (for --skip-empty-dirs)."""
        sfd, dfd, relpath = d.sfd, d.dfd, d.relpath
        try:
            with os.scandir(sfd) as it:
                entries = sorted((os.fsencode(e.name), e) for e in it)
        except OSError as exc:
            # Never delete in DST what we could not list in SRC.
            self._problem(relpath or b".", "unreadable", f"directory cannot be listed: {exc.strerror}")
            return 1
        protected: set[bytes] = set()
        items: list[tuple[bytes, bytes, os.stat_result, bool]] = []
        for name, entry in entries:
            crel = join(relpath, name)
            if self.filter.excluded(crel, name):
                protected.add(name)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                self._problem(crel, "vanished", "disappeared before it could be read")
                continue
            except OSError as exc:
                protected.add(name)
                self._problem(crel, "unreadable", exc.strerror or str(exc))
                continue
            inc = included or self.filter.included(crel, name)
            if not inc and not stat.S_ISDIR(st.st_mode):
                protected.add(name)
                continue
            items.append((name, crel, st, inc))
        if self.opts.delete and not d.fresh:
            self._delete_extras(dfd, relpath, {i[0] for i in items} | protected, included)
        kept = 0
        for name, crel, st, inc in items:
            if self._cancel.is_set():
                return kept + 1
            try:
                kept += self._entry(d, name, crel, st, inc)
            except OSError as exc:
                self._os_problem(crel, exc)
                kept += 1
        return kept

    def _delete_extras(self, dfd: int, relpath: bytes, keep: set[bytes], included: bool) -> None:
        delete_extras(dfd, relpath, lambda n, crel: n in keep or self.filter.protects(crel, n, included=included),
                      self._removed, self._problem)

    def _removed(self, relpath: bytes, st: os.stat_result) -> None:
        self._count(deleted=1)
        self._done("delete", relpath, st.st_size if stat.S_ISREG(st.st_mode) else 0)

    def _entry(self, d: _Dir, name: bytes, relpath: bytes, st: os.stat_result, included: bool) -> int:
        sfd, dfd = d.sfd, d.dfd
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            return self._dir(d, name, relpath, st, included)
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
            if key is not None:
                with self._lock:  # a worker's result may register the same inode meanwhile
                    first = self._first_link.setdefault(key, relpath)
                if first != relpath:
                    self._links.append((relpath, first))
                    d.deferred = True
                    return 1
            self._submit(d, name, relpath, st)
            return 1
        if stat.S_ISSOCK(mode):
            self._done("skip", relpath, 0, note="socket: recreated by its server, not copied")
            return 0
        if stat.S_ISLNK(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            self._special(sfd, dfd, name, relpath, st)
            return 1
        self._done("skip", relpath, 0, note=f"unknown file type {stat.S_IFMT(mode):o}")
        return 0

    def _dir(self, parent: _Dir, name: bytes, relpath: bytes, st: os.stat_result, included: bool) -> int:
        sfd, dfd = parent.sfd, parent.dfd
        dst = None if parent.fresh else lstat_at(dfd, name)
        if dst is not None and not stat.S_ISDIR(dst.st_mode):
            os.unlink(name, dir_fd=dfd)  # a file where SRC now has a directory
            dst = None
        created = dst is None
        if created:
            os.mkdir(name, 0o700, dir_fd=dfd)
            self._count(dirs_created=1)
        if self._shards is not None and relpath.count(b"/") + 1 == self._shard_depth:
            self._delegate(parent, relpath, st, created, included)
            return 1
        try:
            csfd = os.open(name, DIR_FLAGS, dir_fd=sfd)
        except FileNotFoundError:
            self._problem(relpath, "vanished", "directory disappeared before it could be read")
            return 0
        except OSError as exc:
            self._problem(relpath, "unreadable", exc.strerror or str(exc))
            return 1
        try:
            cdfd = os.open(name, DIR_FLAGS, dir_fd=dfd)
        except BaseException:
            os.close(csfd)
            raise
        d = self._enter(parent, relpath, st, csfd, cdfd, fresh=created)
        kept = 1
        try:
            kept = self._sync_dir(d, included=included)
            if created:
                self._done("mkdir", relpath, 0)
            if kept == 0 and self.opts.skip_empty_dirs:
                d.dropped = True
        finally:
            self._release(d)
        if d.dropped:
            try:
                os.rmdir(name, dir_fd=dfd)
            except OSError:
                return 1  # DST keeps entries of its own here; its metadata stays as it was
            if created:
                self._count(dirs_created=-1)
            return 0
        return 1

    def _delegate(self, parent: _Dir, relpath: bytes, st: os.stat_result, created: bool, included: bool) -> None:
        """A worker process syncs this subtree; its metadata is applied at the end."""
        assert self._shards is not None
        xattrs = None
        if self.meta.any_xattrs:
            try:
                xattrs = self.meta.source_xattrs(path=proc_path(parent.sfd, relpath.rpartition(b"/")[2]))
            except OSError as exc:
                self._problem(relpath, "metadata", f"extended attributes unreadable: {exc.strerror}")
        d = _Dir(relpath, st, xattrs, -1, -1, parent, created, deferred=True)
        with self._lock:
            parent.pending += 1
        self._shards.submit(relpath, created, included, lambda r: self._shard_done(d, r))

    def _shard_done(self, d: _Dir, r: ShardResult | None) -> None:
        if r is None:
            if not self._cancel.is_set():
                self._problem(d.relpath, "write", "the worker process syncing it died")
            self._release(d)
            return
        with self._lock:
            self.stats.add(r.stats)
            self.problems.extend(r.problems)
            self._stopped = self._stopped or r.stopped
        if r.fatal is not None:
            kind, _, message = r.fatal.partition(": ")
            if kind == "NoSpace":
                with self._lock:
                    self._fatal = self._fatal or NoSpace(message)
            else:
                self._problem(d.relpath, "write", f"worker process failed: {r.fatal}")
            self._cancel.set()
        for key, paths in r.links.items():
            with self._lock:
                first = self._first_link.setdefault(key, paths[0])
            if first == paths[0]:
                continue
            # The inode is already in DST under another subtree's path: link these to it.
            # What the worker copied and linked for them is redone, so not counted twice.
            undo = {"hardlinks": -sum(p in r.links_made for p in paths)}
            if paths[0] in r.link_copies:
                undo[r.link_copies[paths[0]]] = -1
            self._count(**undo)
            for p in paths:
                self._links.append((p, first))
                self._relinked_dirs.add(p.rpartition(b"/")[0])
        if r.kept == 0 and self.opts.skip_empty_dirs:
            try:
                os.rmdir(d.relpath.rpartition(b"/")[2], dir_fd=d.parent.dfd if d.parent else -1)
                d.dropped = True
                if d.fresh:
                    self._count(dirs_created=-1)
            except OSError:
                pass
        self._release(d)

    # ------------------------------------------------------------------ symlinks, devices, FIFOs
    def _special(self, sfd: int, dfd: int, name: bytes, relpath: bytes, st: os.stat_result) -> None:
        is_link = stat.S_ISLNK(st.st_mode)
        try:
            target = os.readlink(name, dir_fd=sfd) if is_link else b""
            xattrs = self.meta.source_xattrs(path=proc_path(sfd, name)) if not is_link else None
        except FileNotFoundError:
            self._problem(relpath, "vanished", "disappeared before it could be read")
            return
        except OSError as exc:
            self._problem(relpath, "unreadable", exc.strerror or str(exc))
            return
        dst = lstat_at(dfd, name)
        if dst is not None and stat.S_ISDIR(dst.st_mode) and not self._clear_dir(dfd, name, relpath):
            return
        action, probs = place_special(dfd, name, st, target, xattrs, self.meta,
                                      lambda n: self._temp(relpath, n), lambda t: self._untemp(relpath, t))
        for m in probs:
            self._problem(relpath, "metadata", m)
        self._count(**{_SPECIAL_COUNTERS[action]: 1})
        self._done(action, relpath, 0)

    def _clear_dir(self, dfd: int, name: bytes, relpath: bytes) -> bool:
        """A directory in DST stands where SRC has a file: only --delete removes it."""
        if not self.opts.delete:
            self._problem(relpath, "write", "a directory is in the way in the destination (--delete replaces it)")
            return False
        remove_entry(dfd, name, relpath, self._removed)
        return True

    # ------------------------------------------------------------------ regular files
    def _submit(self, d: _Dir, name: bytes, relpath: bytes, st: os.stat_result) -> None:
        with self._lock:
            d.pending += 1
        if st.st_size < THREAD_MIN:
            # Small files cost a dozen short system calls each; handing them to threads
            # costs more in GIL hand-offs than it saves, so the walker copies them itself.
            self._file_job(d, name, relpath, st)
            return
        try:
            fut = self._pool.submit(self._file_job, d, name, relpath, st)
        except BaseException:
            self._release(d)
            raise
        self._jobs.append(fut)
        if len(self._jobs) > 4096:
            self._jobs = [j for j in self._jobs if not j.done()]

    def _wait_jobs(self) -> None:
        for fut in self._jobs:
            if not fut.cancelled():
                fut.result()

    def _file_job(self, d: _Dir, name: bytes, relpath: bytes, st: os.stat_result) -> None:
        try:
            if not self._cancel.is_set():
                self._sync_file(d.sfd, d.dfd, name, relpath, st, d.fresh)
        except Cancelled:
            pass
        except OSError as exc:
            self._os_problem(relpath, exc)
        finally:
            self._release(d)

    def _sync_file(self, sfd: int, dfd: int, name: bytes, relpath: bytes, st: os.stat_result,
                   fresh: bool) -> None:
        dst = None if fresh else lstat_at(dfd, name)
        if dst is not None and stat.S_ISDIR(dst.st_mode):
            if not self._clear_dir(dfd, name, relpath):
                return
            dst = None
        dst_reg = dst if dst is not None and stat.S_ISREG(dst.st_mode) else None
        if (dst_reg is not None and not self.opts.checksum and dst_reg.st_size == st.st_size
                and dst_reg.st_mtime_ns == st.st_mtime_ns):
            try:
                xattrs = self.meta.source_xattrs(path=proc_path(sfd, name))
            except OSError as exc:
                self._problem(relpath, "metadata", f"extended attributes unreadable: {exc.strerror}")
                xattrs = None
            self._same(dfd, name, relpath, st, dst_reg, xattrs)
            return
        for attempt in range(1, self.opts.attempts + 1):
            fd = self._open_source(sfd, name, relpath)
            if fd is None:
                return
            staged: _Staged | None = None
            try:
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode):
                    self._problem(relpath, "changed", "no longer a regular file")
                    return
                try:
                    xattrs = self.meta.source_xattrs(fd=fd)
                except OSError as exc:
                    self._problem(relpath, "metadata", f"extended attributes unreadable: {exc.strerror}")
                    xattrs = None
                # Same size, other mtime (or --checksum): often the same bytes (a reinstall, a
                # touch). Comparing costs a read of DST; copying would cost a write of it.
                if (dst_reg is not None and dst_reg.st_size == fst.st_size
                        and (self.opts.checksum or fst.st_size < self.opts.delta_min)
                        and self._same_content(fd, dfd, name, fst.st_size)):
                    self._same(dfd, name, relpath, fst, dst_reg, xattrs)
                    return
                try:
                    staged = self._stage(fd, fst, dfd, name, relpath, dst_reg, xattrs, fresh)
                except SourceChanged:
                    staged = None
                after = os.fstat(fd)
            except SourceReadError as exc:
                self._problem(relpath, "unreadable", str(exc), size=st.st_size)
                return
            except OSError as exc:
                if staged is not None and staged.tmp is not None:
                    unlink_quiet(dfd, staged.tmp)
                if exc.errno in NO_SPACE_ERRNOS or exc.errno == errno.EROFS:
                    raise
                self._problem(relpath, "write", exc.strerror or str(exc), size=st.st_size)
                return
            except BaseException:
                if staged is not None and staged.tmp is not None:
                    unlink_quiet(dfd, staged.tmp)
                raise
            finally:
                os.close(fd)
            if staged is None or changed_since(fst, after):
                if staged is not None and staged.tmp is not None:
                    unlink_quiet(dfd, staged.tmp)
                if attempt < self.opts.attempts:
                    continue
                self._problem(relpath, "changed",
                              f"changed while being copied, {self.opts.attempts} times; the destination "
                              "keeps its previous version" + (" (updated in place: may be mixed)"
                                                              if staged is not None and staged.tmp is None else ""),
                              size=fst.st_size)
                return
            self._install(dfd, name, relpath, fst, staged)
            return

    def _open_source(self, sfd: int, name: bytes, relpath: bytes) -> int | None:
        try:
            return open_source(sfd, name)
        except OpenFailed as exc:
            self._problem(relpath, exc.kind, str(exc))
            return None

    def _same(self, dfd: int, name: bytes, relpath: bytes, st: os.stat_result, dst: os.stat_result,
              xattrs: list[tuple[bytes, bytes]] | None) -> None:
        """Content is equal; correct metadata that differs."""
        action, probs = fix_meta(dfd, name, st, dst, xattrs, self.meta)
        for m in probs:
            self._problem(relpath, "metadata", m)
        self._count(**{"files_same" if action == "same" else "meta_fixed": 1})
        self._done(action, relpath, st.st_size)
        self.reporter.advance(items=1)

    def _same_content(self, fd: int, dfd: int, name: bytes, size: int) -> bool:
        try:
            ofd = os.open(name, _READ_FLAGS, dir_fd=dfd)
        except OSError:
            return False
        try:
            a, b = self.buffers.get(0), self.buffers.get(1)
            off = 0
            while off < size:
                n = read_source(fd, a, off)
                m = pread_full(ofd, b[:n], off)
                if n == 0 or m != n or a[:n].tobytes() != b[:n].tobytes():
                    return False
                off += n
            return True
        finally:
            os.close(ofd)

    def _stage(self, fd: int, st: os.stat_result, dfd: int, name: bytes, relpath: bytes,
               dst: os.stat_result | None, xattrs: list[tuple[bytes, bytes]] | None, fresh: bool) -> _Staged:
        hasher = blake3.blake3() if self.opts.verify else None
        cancelled = self._cancel.is_set
        if (dst is not None and self.opts.delta and st.st_size >= self.opts.delta_min
                and dst.st_size >= self.opts.delta_min):
            staged = self._stage_delta(fd, st, dfd, name, relpath, dst, xattrs, hasher)
            if staged is not None:
                return staged
        tmp = self._temp(relpath, name)
        perm = stat.S_IMODE(st.st_mode) & 0o777
        # In a directory this run created (no default ACL, not setgid) a new file gets
        # (euid, egid) and perm & ~umask: then chown and chmod can be skipped.
        same_owner = fresh and (st.st_uid, st.st_gid) == self._ids
        same_mode = fresh and same_owner and perm == stat.S_IMODE(st.st_mode) and not perm & self._umask
        tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      perm if same_mode else 0o600, dir_fd=dfd)
        try:
            written = copy_data(fd, tfd, st, self.buffers, hasher, cancelled)
            self._finish_target(tfd, relpath, st, xattrs, chown=not same_owner, chmod=not same_mode)
        except BaseException:
            os.close(tfd)
            unlink_quiet(dfd, tmp)
            raise
        os.close(tfd)
        return _Staged(tmp, "update" if dst is not None else "new", written,
                       hasher.digest() if hasher is not None else None)

    def _stage_delta(self, fd: int, st: os.stat_result, dfd: int, name: bytes, relpath: bytes,
                     dst: os.stat_result, xattrs: list[tuple[bytes, bytes]] | None,
                     hasher: blake3.blake3 | None) -> _Staged | None:
        """Rewrite only the changed pages: into a clone of the old file, or (--inplace) into
        the old file itself. None: neither is possible here, copy the file whole."""
        inplace = self.opts.inplace and dst.st_nlink == 1
        ofd = os.open(name, _READ_FLAGS, dir_fd=dfd)
        tmp: bytes | None = None
        tfd = -1
        try:
            if inplace:
                tfd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            else:
                tmp = self._temp(relpath, name)
                tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                              0o600, dir_fd=dfd)
                if not reflink(ofd, tfd):
                    os.close(tfd)
                    tfd = -1
                    unlink_quiet(dfd, tmp)
                    return None
            res = page_delta(fd, ofd, tfd, st.st_size, dst.st_size, self.buffers, hasher, self._cancel.is_set)
            self._finish_target(tfd, relpath, st, xattrs)
        except BaseException:
            if tmp is not None:
                unlink_quiet(dfd, tmp)
            raise
        finally:
            os.close(ofd)
            if tfd >= 0:
                os.close(tfd)
        return _Staged(tmp, "delta", res.written, hasher.digest() if hasher is not None else None,
                       reflinked=not inplace)

    def _finish_target(self, tfd: int, relpath: bytes, st: os.stat_result,
                       xattrs: list[tuple[bytes, bytes]] | None, *, chown: bool = True, chmod: bool = True) -> None:
        for m in self.meta.apply_fd(tfd, st, xattrs, chmod=chmod, chown=chown):
            self._problem(relpath, "metadata", m)
        if self.opts.verify:
            os.fsync(tfd)

    def _install(self, dfd: int, name: bytes, relpath: bytes, st: os.stat_result, staged: _Staged) -> None:
        current = staged.tmp if staged.tmp is not None else name
        if staged.digest is not None:
            n, problem = verify_written(dfd, current, name, st.st_size, staged.digest, self.buffers.size)
            self._count(bytes_verified=n, files_verified=1)
            if problem is not None:
                if staged.tmp is not None:
                    self._untemp(relpath, staged.tmp)
                self._problem(relpath, "verify", problem, size=st.st_size)
                return
        if staged.tmp is not None:
            try:
                os.rename(staged.tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                unlink_quiet(dfd, staged.tmp)
                raise
            self._untemp(relpath, staged.tmp)
        if st.st_nlink > 1:
            with self._lock:
                self.link_copies[relpath] = {"delta": "files_delta", "update": "files_updated"}.get(
                    staged.action, "files_new")
        if staged.action == "delta":
            self._count(files_delta=1, delta_bytes_written=staged.written, delta_file_bytes=st.st_size,
                        delta_reflinked=int(staged.reflinked))
        elif staged.action == "update":
            self._count(files_updated=1, bytes_copied=staged.written)
        else:
            self._count(files_new=1, bytes_copied=staged.written)
        self._done(staged.action, relpath, st.st_size, written=staged.written, digest=staged.digest)
        self.reporter.advance(nbytes=st.st_size, items=1, current=display(relpath))

    # ------------------------------------------------------------------ final phases
    def _make_links(self, root: int) -> None:
        for relpath, first in self._links:
            if self._cancel.is_set():
                return
            try:
                self._link(root, relpath, first)
            except OSError as exc:
                self._os_problem(relpath, exc)

    def _link(self, root: int, relpath: bytes, first: bytes) -> None:
        action, size = hard_link(root, relpath, first, lambda n: self._temp(relpath, n),
                                 lambda t: self._untemp(relpath, t), lambda fd, n: self._clear_dir(fd, n, relpath))
        if action == "missing":
            self._problem(relpath, "write", f"hard link to {display(first)}, which was not synced")
        elif action == "same":
            self._count(files_same=1)
            self._done("same", relpath, size)
        elif action == "hardlink":
            with self._lock:
                self.links_made.add(relpath)
            self._count(hardlinks=1)
            self._done("hardlink", relpath, size, note=f"-> {display(first)}")

    def _finish_deferred(self, root: int) -> None:
        """Metadata of directories that received hard links, deepest first."""
        have = {d.relpath for d in self._deferred}
        for rel in self._relinked_dirs - have:  # a worker applied it before the link was made
            try:
                st = os.stat(os.path.join(self.src, rel), follow_symlinks=False)
                xattrs = self.meta.source_xattrs(path=os.path.join(self.src, rel))
            except OSError:
                continue
            self._deferred.append(_Deferred(rel, st, xattrs))
        for d in sorted(self._deferred, key=lambda x: -x.relpath.count(b"/") - bool(x.relpath)):
            try:
                fd = open_dir(root, d.relpath)
            except OSError as exc:
                self._os_problem(d.relpath or b".", exc, "metadata")
                continue
            try:
                self._apply_dir_meta(fd, d.relpath, d.st, d.xattrs)
            finally:
                os.close(fd)




_SPECIAL_COUNTERS = {"same": "files_same", "meta": "meta_fixed", "symlink": "symlinks", "special": "special"}
