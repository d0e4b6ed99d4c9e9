"""The sync engine: mirror SRC into DST.

The main thread walks SRC, creates directories, symlinks and special files, deletes
extras (--delete) and hands regular files to a pool of copy threads. A file is written
under a temp name and renamed into place, so an interrupted run never leaves a half-written
file under a real name. Hard links are made once every file is in place, and directory
metadata last, deepest first (writing into a directory changes its mtime).

Other local users may write in DST while we work. Every operation on DST is relative to a
directory fd opened component by component with O_NOFOLLOW from DST's root, and checked
to be the directory we made or met (dev, ino); entries are changed only through their own
fd or a checked handle (sync/dest.py). SRC and DST are kept apart by identity, bind mounts
included (sync/guard.py).

The walk is iterative (an explicit stack: no depth limit, no path length limit) and holds
at most MAX_OPEN_DIRS directories of each tree open: deeper, the shallowest are closed and
opened again through ".." when the walk climbs back, checked to be the same directories.
A directory that has files still being copied keeps its fds until they are done; one
waiting only for its subdirectories closes them, and its last subdirectory to finish opens
it again (through "..") to set its metadata.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import stat
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import blake3

from deltavault.errors import NO_SPACE_ERRNOS, NoSpace, UsageError
from deltavault.fs.clone import pread_full, reflink
from deltavault.fs.dirfd import (
    Identity,
    created_dir,
    identity,
    lstat_at,
    mount_id,
    open_dir_at,
    open_dir_checked,
    open_dir_path,
    open_parent_checked,
)
from deltavault.fs.paths import display, open_target_dir, proc_path
from deltavault.progress import NullReporter, Reporter
from deltavault.sync.data import (
    BufferPool,
    Cancelled,
    SourceChanged,
    SourceReadError,
    copy_data,
    read_source,
)
from deltavault.sync.filters import Filter
from deltavault.sync.guard import Guard, check_missing_dest, mount_root
from deltavault.sync.local.delta import PAGE, page_delta
from deltavault.sync.local.shards import ShardPool, ShardResult, shard_depth
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.entries import (
    OpenFailed,
    changed_since,
    delete_extras,
    detach,
    fix_meta,
    hard_link,
    link_failed,
    link_target,
    needs_copy,
    open_existing,
    open_source,
    place_special,
    single,
    unlink_quiet,
    verify_written,
)
from deltavault.sync.receiver.remove import MAX_OPEN_DIRS, join, remove_entry, temp_name
from deltavault.sync.report import SyncLog, SyncProblem, SyncStats
from deltavault.workers import BoundedPool

THREAD_MIN = 1024 * 1024  # files from this size on are copied by the thread pool
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # the roots: the user's paths, as given

Where = tuple[bytes, Identity | None]  # a DST directory: its path, and its identity if known
Item = tuple[bytes, bytes, os.stat_result, bool]  # name, path, lstat, included


@dataclass
class _Staged:
    """A file's new content, written and waiting to be renamed into place."""

    tmp: bytes | None  # None: written in place (--inplace)
    action: str  # new | update | delta
    written: int
    ident: Identity  # the file written (to check it before verifying and linking)
    digest: bytes | None = None
    reflinked: bool = False


@dataclass(eq=False)
class _Dir:
    """A directory being synced. Its fds stay open while the walk is in it or files of its
    own are being copied; its metadata is applied once everything below is in place
    (writing into a directory changes its mtime)."""

    relpath: bytes
    st: os.stat_result  # the source directory's
    xattrs: list[tuple[bytes, bytes]] | None
    sfd: int  # -1: closed for now
    dfd: int
    parent: _Dir | None
    fresh: bool  # created by this run: DST holds nothing here yet
    sident: Identity
    dident: Identity
    smnt: int = -1  # mount ids, to see mount roots below
    dmnt: int = -1
    included: bool = True
    listed: bool = True  # False: not listed (a loop or overlap): kept empty, nothing deleted
    items: list[Item] = field(default_factory=list)
    next: int = 0  # the next item the walk takes
    kept: int = 0  # entries kept (for --skip-empty-dirs)
    pending: int = 1  # the walker's hold, + unfinished files and subdirectories
    jobs: int = 0  # files of its own being copied (they use its fds)
    walked: bool = False  # the walk is done with it
    lost: bool = False  # moved away during the run: not reachable any more
    deferred: bool = False  # hard links will be made here: metadata after them
    dropped: bool = False  # removed (--skip-empty-dirs): no metadata

    @property
    def name(self) -> bytes:
        return self.relpath.rpartition(b"/")[2]

    @property
    def where(self) -> Where:
        return self.relpath, self.dident


@dataclass
class _Deferred:
    relpath: bytes
    st: os.stat_result
    xattrs: list[tuple[bytes, bytes]] | None
    dident: Identity | None


@dataclass
class SyncResult:
    stats: SyncStats
    problems: list[SyncProblem] = field(default_factory=list)
    stopped: bool = False  # --stop-on-error ended the run early
    workers: int = 0  # worker processes that synced subtrees (0: all in this process)
    wire: tuple[int, int] | None = None  # push sync: bytes sent and received over ssh


def _chain(d: _Dir | None) -> list[_Dir]:
    """d and the directories above it, from the run's root down."""
    out = []
    while d is not None:
        out.append(d)
        d = d.parent
    return out[::-1]


class Syncer:
    def __init__(self, src: str | bytes, dst: str | bytes, options: SyncOptions,
                 reporter: Reporter | None = None, log: SyncLog | None = None, *,
                 cancel: Any = None, processes: int | None = None, buffers: BufferPool | None = None,
                 roots: tuple[int, int] | None = None, guard: Guard | None = None) -> None:
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
        self._idle = threading.Condition(self._lock)  # a directory's own copies are done
        # Shared with worker processes when there are any (a multiprocessing Event).
        self._cancel: Any = cancel if cancel is not None else threading.Event()
        self._processes = options.processes if processes is None else processes
        self._shards: ShardPool | None = None
        self._shard_depth = -1
        self.workers = 0
        # The roots, open for the whole run (a worker is given its parent's, inherited).
        self._given_roots = roots
        self._sroot = self._droot = -1
        self._guard = guard
        self._entered: set[Identity] = set()  # source directories entered: none twice
        self._relinked_dirs: set[bytes] = set()
        self._fatal: NoSpace | None = None
        self._stopped = False
        self._jobs: list[Future[None]] = []
        self._open: set[_Dir] = set()
        self._deferred: list[_Deferred] = []
        self._temps: set[tuple[bytes, Identity | None, bytes]] = set()  # removed if the run is interrupted
        self._first_link: dict[tuple[int, int], bytes] = {}
        self._links: list[tuple[bytes, bytes]] = []
        # Hard-link groups: the file each group's names are linked to, by its first path, and
        # whether this run installed it (else it was kept as it was: see dest.needs_copy).
        self.targets: dict[bytes, tuple[Identity, bool]] = {}
        self.dir_ids: dict[bytes, Identity] = {}  # DST directories holding hard-linked names
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
        self._open_roots()
        try:
            self._run(b"", fresh=False, included=not self.filter.has_includes, top=True)
        finally:
            self._close_roots()
        if self._fatal is not None:
            raise self._fatal
        return SyncResult(self.stats, self.problems, self._stopped, self.workers)

    def run_subtree(self, relpath: bytes, *, fresh: bool, included: bool,
                    expect: tuple[Identity, Identity] | None = None, seen: list[Identity] | None = None) -> int:
        """Sync SRC/relpath into DST/relpath, which exists (and must be the directories
        ``expect``), leaving that directory's own metadata to the caller. ``seen``: the
        source directories above it (a bind mount of one of them is a loop). Returns how
        many entries it kept."""
        self._entered.update(seen or [])
        self._open_roots()
        try:
            kept = self._run(relpath, fresh=fresh, included=included, top=False, expect=expect)
        finally:
            self._close_roots()
        if self._fatal is not None:
            raise self._fatal
        return kept

    def _open_roots(self) -> None:
        if self._given_roots is not None:
            self._sroot, self._droot = os.dup(self._given_roots[0]), os.dup(self._given_roots[1])
            return
        try:
            self._sroot = os.open(self.src, _ROOT_FLAGS)
        except OSError:
            raise UsageError(f"source {display(self.src)} is not a directory") from None
        try:
            try:
                self._droot = os.open(self.dst, _ROOT_FLAGS)
            except FileNotFoundError:
                check_missing_dest(identity(os.fstat(self._sroot)), self.dst, self.src)
                self._droot = open_target_dir(self.dst, "destination")
            except OSError:
                self._droot = open_target_dir(self.dst, "destination")  # its precise error
            self._guard = Guard.local(self._sroot, self._droot)
            self._guard.check(self.src, self.dst)
        except BaseException:
            self._close_roots()
            raise

    def _close_roots(self) -> None:
        for fd in (self._sroot, self._droot):
            if fd >= 0:
                os.close(fd)
        self._sroot = self._droot = -1

    def _run(self, relpath: bytes, *, fresh: bool, included: bool, top: bool,
             expect: tuple[Identity, Identity] | None = None) -> int:
        try:
            sfd = open_dir_path(self._sroot, relpath)
            try:
                dfd = open_dir_path(self._droot, relpath)
            except BaseException:
                os.close(sfd)
                raise
        except OSError as exc:
            self._problem(relpath or b".", "unreadable", exc.strerror or str(exc))
            return 1
        sst, dst = os.fstat(sfd), os.fstat(dfd)
        if expect is not None and (identity(sst), identity(dst)) != expect:
            os.close(sfd)
            os.close(dfd)
            self._problem(relpath, "changed", "replaced by another directory during the run; not synced")
            return 1
        if top and self._processes > 1:
            depth = shard_depth(sfd, self._processes, self.filter.excluded)
            if depth is not None:
                # Forked now, while this process has a single thread; workers inherit the roots.
                self._cancel = mp.get_context("fork").Event()
                self._shards = ShardPool(self._processes, self.src, self.dst, self.opts, self.log,
                                         self._cancel, self.reporter, (self._sroot, self._droot), self._guard)
                self._shard_depth = depth
                self.workers = self._processes
        pool = BoundedPool(self._threads, self._threads * 2, "dv-sync")
        if top:
            self.reporter.start("sync")
        kept = 1
        try:
            self._pool = pool
            root = self._enter(None, relpath, sst, sfd, dfd, fresh=fresh, included=included,
                               dident=identity(dst), smnt=mount_id(sfd), dmnt=mount_id(dfd))
            root.dropped = not top  # the caller owns the subtree root's metadata
            self._entered.add(root.sident)
            self._walk(root)
            kept = root.kept
            self._wait_jobs()
            if self._shards is not None:
                self._shards.close()
                self._shards = None
            if not self._cancel.is_set():
                self._make_links()
                self._finish_deferred()
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
                self._close_fds(d)
            if self._cancel.is_set():
                self._remove_temps()
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

    def _temp(self, where: Where, name: bytes) -> bytes:
        """A temp name in the DST directory ``where``, registered before it is created so
        that an interrupt at any point (Ctrl-C lands between any two statements) cannot
        leave it behind."""
        tmp = temp_name(name)
        with self._lock:
            self._temps.add((where[0], where[1], tmp))
        return tmp

    def _untemp(self, where: Where, tmp: bytes) -> None:
        with self._lock:
            self._temps.discard((where[0], where[1], tmp))

    def _remove_temps(self) -> None:
        """Each directory is found again from DST's root, by fd, and checked."""
        with self._lock:
            temps, self._temps = self._temps, set()
        for rel, ident, tmp in temps:
            try:
                fd = open_dir_path(self._droot, rel)
            except OSError:
                continue
            try:
                if ident is None or identity(os.fstat(fd)) == ident:
                    unlink_quiet(fd, tmp)
            finally:
                os.close(fd)

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

    def _enter(self, parent: _Dir | None, relpath: bytes, st: os.stat_result, sfd: int, dfd: int, *,
               fresh: bool, included: bool, dident: Identity, smnt: int, dmnt: int) -> _Dir:
        d = _Dir(relpath, st, self._dir_xattrs(sfd, relpath), sfd, dfd, parent, fresh, identity(st), dident,
                 smnt, dmnt, included)
        with self._lock:
            self._open.add(d)
            if parent is not None:
                parent.pending += 1
        return d

    def _walk(self, root: _Dir) -> None:
        """Depth first, with an explicit stack; each directory is left (metadata, --skip-empty-dirs)
        once the walk has been through everything below it."""
        stack = [root]
        self._list(root)
        closed_below = 1  # stack[1:closed_below] have their fds closed (MAX_OPEN_DIRS)
        while stack:
            d = stack[-1]
            if d.next < len(d.items) and not d.lost and not self._cancel.is_set():
                name, crel, st, inc = d.items[d.next]
                d.next += 1
                try:
                    got = self._entry(d, name, crel, st, inc)
                except OSError as exc:
                    self._os_problem(crel, exc)
                    got = 1
                if isinstance(got, _Dir):
                    stack.append(got)
                    self._list(got)
                    closed_below = self._bound(stack, closed_below)
                else:
                    d.kept += got
                continue
            if d.next < len(d.items):
                d.kept += 1  # not walked to the end: never removed as empty
            stack.pop()
            if stack and stack[-1].dfd < 0:
                self._reopen(stack, d)
                closed_below = len(stack) - 1
            kept = self._leave(d, stack[-1] if stack else None)
            if stack:
                stack[-1].kept += kept

    def _bound(self, stack: list[_Dir], closed_below: int) -> int:
        """Close the shallowest open directories beyond MAX_OPEN_DIRS (once their own
        copies are done: those use their fds)."""
        while len(stack) - closed_below > MAX_OPEN_DIRS:
            f = stack[closed_below]
            with self._idle:
                while f.jobs:
                    self._idle.wait(0.5)
                self._close_fds(f)
            closed_below += 1
        return closed_below

    def _reopen(self, stack: list[_Dir], child: _Dir) -> None:
        """Open again the (closed) directory on top of ``stack``: through ".." of ``child``,
        or else by name from the run's root, each level checked to be what it was."""
        top = stack[-1]
        s = open_parent_checked(child.sfd, top.sident)
        d = open_parent_checked(child.dfd, top.dident)
        if s is None or d is None:
            for fd in (s, d):
                if fd is not None:
                    os.close(fd)
            try:
                s = self._open_chain(top, src=True)
                try:
                    d = self._open_chain(top, src=False)
                except BaseException:
                    os.close(s)
                    raise
            except OSError:
                top.lost = True
                self._problem(top.relpath or b".", "changed", "moved during the run; its entries after "
                              f"{display(top.items[top.next - 1][0]) if top.next else 'the start'} were not synced")
                return
        top.sfd, top.dfd = s, d

    def _open_chain(self, d: _Dir, *, src: bool) -> int:
        """d's directory in SRC or DST, opened from the run's root one level at a time, each
        checked to be the directory the walk met there."""
        chain = _chain(d)
        fd = open_dir_path(self._sroot if src else self._droot, chain[0].relpath)
        try:
            if identity(os.fstat(fd)) != (chain[0].sident if src else chain[0].dident):
                raise OSError(errno.ESTALE, "replaced")
            for x in chain[1:]:
                nfd = open_dir_checked(fd, x.name, x.sident if src else x.dident)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _leave(self, d: _Dir, parent: _Dir | None) -> int:
        """The walk is done with d: returns whether it is kept in its parent (--skip-empty-dirs)."""
        if d.fresh and parent is not None:
            self._done("mkdir", d.relpath, 0)
        if parent is not None and d.kept == 0 and self.opts.skip_empty_dirs:
            d.dropped = True
        with self._lock:
            d.walked = True
        self._release(d)
        if not d.dropped or parent is None:
            return 1
        try:
            os.rmdir(d.name, dir_fd=parent.dfd)
        except OSError:
            return 1  # DST keeps entries of its own here; its metadata stays as it was
        if d.fresh:
            self._count(dirs_created=-1)
        return 0

    def _release(self, d: _Dir) -> None:
        """One piece of d's work is done; the last one finishes d, then its parent. A parent
        whose fds were let go (only its subdirectories' work was left) is opened again
        through ".." of the child that finishes it, by whichever thread takes its count to
        zero: deciding before the count is taken would race with a sibling's release."""
        child: _Dir | None = None
        while True:
            with self._lock:
                d.pending -= 1
                if d.pending:
                    if d.walked and not d.jobs:
                        self._close_fds(d)  # only its subdirectories' work is left
                    last = False
                else:
                    self._open.discard(d)
                    last = True
            if not last:
                if child is not None:
                    self._close_fds(child)
                return
            if child is not None:
                if d.dfd < 0 and not (d.lost or d.dropped or d.deferred):
                    self._reopen_for_meta(d, child)
                self._close_fds(child)
            self._finish_dir(d)
            if d.parent is None:
                self._close_fds(d)
                return
            child, d = d, d.parent

    def _reopen_for_meta(self, p: _Dir, child: _Dir) -> None:
        fd = open_parent_checked(child.dfd, p.dident) if child.dfd >= 0 else None
        if fd is None:
            try:
                fd = self._open_chain(p, src=False)
            except OSError:
                p.lost = True
                self._problem(p.relpath or b".", "changed", "moved during the run; its metadata was not set")
                return
        p.dfd = fd

    def _close_fds(self, d: _Dir) -> None:
        for fd in (d.sfd, d.dfd):
            if fd >= 0:
                os.close(fd)
        d.sfd = d.dfd = -1

    def _finish_dir(self, d: _Dir) -> None:
        if d.dropped:
            return
        if d.deferred:
            with self._lock:
                self._deferred.append(_Deferred(d.relpath, d.st, d.xattrs, d.dident))
            return
        if d.dfd >= 0:
            self._apply_dir_meta(d.dfd, d.relpath, d.st, d.xattrs)
        elif not d.lost:  # (a directory moved away is reported when it is found so)
            self._problem(d.relpath or b".", "metadata", "not reachable when its entries were done; "
                          "its metadata was not set")

    def _apply_dir_meta(self, fd: int, relpath: bytes, st: os.stat_result,
                        xattrs: list[tuple[bytes, bytes]] | None) -> None:
        for m in self.meta.apply_fd(fd, st, xattrs):
            self._problem(relpath or b".", "metadata", m)

    def _list(self, d: _Dir) -> None:
        """d's entries to sync, into d.items; extras in DST are deleted first (--delete)."""
        if not d.listed:
            d.kept = 1
            return
        try:
            with os.scandir(d.sfd) as it:
                entries = sorted((os.fsencode(e.name), e) for e in it)
        except OSError as exc:
            # Never delete in DST what we could not list in SRC.
            self._problem(d.relpath or b".", "unreadable", f"directory cannot be listed: {exc.strerror}")
            d.kept = 1
            return
        protected: set[bytes] = set()
        for name, entry in entries:
            crel = join(d.relpath, name)
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
            inc = d.included or self.filter.included(crel, name)
            if not inc and not stat.S_ISDIR(st.st_mode):
                protected.add(name)
                continue
            d.items.append((name, crel, st, inc))
        if self.opts.delete and not d.fresh:
            self._delete_extras(d.dfd, d.relpath, {i[0] for i in d.items} | protected, d.included)

    def _delete_extras(self, dfd: int, relpath: bytes, keep: set[bytes], included: bool) -> None:
        delete_extras(dfd, relpath, lambda n, crel: n in keep or self.filter.protects(crel, n, included=included),
                      self._removed, self._problem)

    def _removed(self, relpath: bytes, st: os.stat_result) -> None:
        self._count(deleted=1)
        self._done("delete", relpath, st.st_size if stat.S_ISREG(st.st_mode) else 0)

    def _entry(self, d: _Dir, name: bytes, relpath: bytes, st: os.stat_result, included: bool) -> int | _Dir:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            return self._dir(d, name, relpath, st, included)
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
            if key is not None:
                with self._lock:  # a worker's result may register the same inode meanwhile
                    first = self._first_link.setdefault(key, relpath)
                    self.dir_ids[d.relpath] = d.dident
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
            self._special(d, name, relpath, st)
            return 1
        self._done("skip", relpath, 0, note=f"unknown file type {stat.S_IFMT(mode):o}")
        return 0

    def _dir(self, parent: _Dir, name: bytes, relpath: bytes, st: os.stat_result, included: bool) -> int | _Dir:
        """Enter a subdirectory: its source opened and checked, its DST directory made or
        opened and checked. Returns the directory to walk, or what it keeps in its parent."""
        try:
            csfd = open_dir_at(parent.sfd, name)
        except FileNotFoundError:
            self._problem(relpath, "vanished", "directory disappeared before it could be read")
            return 0
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                self._problem(relpath, "changed", "replaced by a non-directory while being read; not followed")
                return 0
            self._problem(relpath, "unreadable", exc.strerror or str(exc))
            return 1
        try:
            got = self._dir_opened(parent, name, relpath, csfd, st, included)
        except BaseException:
            os.close(csfd)
            raise
        if not isinstance(got, _Dir):
            os.close(csfd)
        return got

    def _dir_opened(self, parent: _Dir, name: bytes, relpath: bytes, csfd: int, st: os.stat_result,
                    included: bool) -> int | _Dir:
        cst = os.fstat(csfd)
        if identity(cst) != identity(st):
            self._problem(relpath, "changed", "replaced by another directory while being read; not synced")
            return 1
        skip, smnt = self._loop_or_overlap(parent, csfd, cst)
        dfd = parent.dfd
        dst = None if parent.fresh else lstat_at(dfd, name)
        if dst is not None and not stat.S_ISDIR(dst.st_mode):
            os.unlink(name, dir_fd=dfd)  # a file where SRC now has a directory
            dst = None
        created = dst is None
        if created:
            os.mkdir(name, 0o700, dir_fd=dfd)
            self._count(dirs_created=1)
            cdfd, dcst = created_dir(dfd, name)
            dmnt = parent.dmnt
        else:
            assert dst is not None
            cdfd, dcst = open_dir_checked(dfd, name, identity(dst)), dst
            dmnt = self._dest_mount(parent, cdfd, relpath)
            if dmnt < 0:
                os.close(cdfd)
                return 1
        if skip is None and self._shards is not None and relpath.count(b"/") + 1 == self._shard_depth:
            xattrs = self._dir_xattrs(csfd, relpath) if self.meta.any_xattrs else None
            os.close(cdfd)
            self._delegate(parent, relpath, cst, created, included, identity(dcst), xattrs)
            return 1
        d = self._enter(parent, relpath, cst, csfd, cdfd, fresh=created, included=included,
                        dident=identity(dcst), smnt=smnt, dmnt=dmnt)
        if skip is not None:
            d.listed = False
            self._problem(relpath, "skipped", skip)
        return d

    def _loop_or_overlap(self, parent: _Dir, fd: int, st: os.stat_result) -> tuple[str | None, int]:
        """Why a source directory must not be walked (it was entered already, or it is a
        mount root showing SRC, DST or a directory of them), and its mount id."""
        is_root, mnt = mount_root(fd, parent.smnt)
        ident = identity(st)
        why = None
        overlap = self._guard.overlap(fd) if is_root and self._guard is not None else None
        if overlap is not None:
            why = f"{overlap}: not synced into itself; kept empty here"
        elif ident in self._entered:
            why = "a directory already synced at another path in this run (a bind mount): kept empty here"
        self._entered.add(ident)
        return why, mnt

    def _dest_mount(self, parent: _Dir, fd: int, relpath: bytes) -> int:
        """The mount id of an existing DST directory; -1 (reported) when it is a mount
        showing SRC or DST itself: nothing is written there."""
        is_root, mnt = mount_root(fd, parent.dmnt)
        if is_root and self._guard is not None:
            overlap = self._guard.overlap(fd)
            if overlap is not None:
                self._problem(relpath, "write", f"left alone: {overlap} (a mount inside the destination)")
                return -1
        return mnt

    def _delegate(self, parent: _Dir, relpath: bytes, st: os.stat_result, created: bool, included: bool,
                  dident: Identity, xattrs: list[tuple[bytes, bytes]] | None) -> None:
        """A worker process syncs this subtree; its metadata is applied at the end."""
        assert self._shards is not None
        d = _Dir(relpath, st, xattrs, -1, -1, parent, created, identity(st), dident, deferred=True, walked=True)
        with self._lock:
            parent.pending += 1
        seen = [x.sident for x in _chain(parent)]
        self._shards.submit(relpath, created, included, (d.sident, d.dident), seen,
                            lambda r: self._shard_done(d, r))

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
            self.targets.update(r.targets)
            self.dir_ids.update(r.dir_ids)
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
        if r.kept == 0 and self.opts.skip_empty_dirs and d.parent is not None:
            self._drop_delegated(d, d.parent)
        self._release(d)

    def _drop_delegated(self, d: _Dir, parent: _Dir) -> None:
        with self._lock:  # the walker may be using or closing the parent's fds
            pfd = parent.dfd
            tmp = -1
            try:
                if pfd < 0:
                    pfd = tmp = self._open_chain(parent, src=False)
                os.rmdir(d.name, dir_fd=pfd)
            except OSError:
                return
            finally:
                if tmp >= 0:
                    os.close(tmp)
        d.dropped = True
        if d.fresh:
            self._count(dirs_created=-1)

    # ------------------------------------------------------------------ symlinks, devices, FIFOs
    def _special(self, d: _Dir, name: bytes, relpath: bytes, st: os.stat_result) -> None:
        is_link = stat.S_ISLNK(st.st_mode)
        try:
            target = os.readlink(name, dir_fd=d.sfd) if is_link else b""
            xattrs = self.meta.source_xattrs(path=proc_path(d.sfd, name)) if not is_link else None
        except FileNotFoundError:
            self._problem(relpath, "vanished", "disappeared before it could be read")
            return
        except OSError as exc:
            self._problem(relpath, "unreadable", exc.strerror or str(exc))
            return
        dst = lstat_at(d.dfd, name)
        if dst is not None and stat.S_ISDIR(dst.st_mode) and not self._clear_dir(d.dfd, name, relpath):
            return
        action, probs = place_special(d.dfd, name, st, target, xattrs, self.meta,
                                      lambda n: self._temp(d.where, n), lambda t: self._untemp(d.where, t))
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
            d.jobs += 1
        if st.st_size < THREAD_MIN:
            # Small files cost a dozen short system calls each; handing them to threads
            # costs more in GIL hand-offs than it saves, so the walker copies them itself.
            self._file_job(d, name, relpath, st)
            return
        try:
            fut = self._pool.submit(self._file_job, d, name, relpath, st)
        except BaseException:
            self._job_done(d)
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
                self._sync_file(d, name, relpath, st)
        except Cancelled:
            pass
        except OSError as exc:
            self._os_problem(relpath, exc)
        finally:
            self._job_done(d)

    def _job_done(self, d: _Dir) -> None:
        with self._idle:
            d.jobs -= 1
            self._idle.notify_all()
        self._release(d)

    def _sync_file(self, d: _Dir, name: bytes, relpath: bytes, st: os.stat_result) -> None:
        sfd, dfd = d.sfd, d.dfd
        dst = None if d.fresh else lstat_at(dfd, name)
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
            if self._same(dfd, name, relpath, st, dst_reg, xattrs):
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
                        and self._same_content(fd, dfd, name, dst_reg, fst.st_size)
                        and self._same(dfd, name, relpath, fst, dst_reg, xattrs)):
                    return
                try:
                    staged = self._stage(fd, fst, d, name, relpath, dst_reg, xattrs)
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
            self._install(d, name, relpath, fst, staged)
            return

    def _open_source(self, sfd: int, name: bytes, relpath: bytes) -> int | None:
        try:
            return open_source(sfd, name)
        except OpenFailed as exc:
            self._problem(relpath, exc.kind, str(exc))
            return None

    def _same(self, dfd: int, name: bytes, relpath: bytes, st: os.stat_result, dst: os.stat_result,
              xattrs: list[tuple[bytes, bytes]] | None) -> bool:
        """Content is equal; correct metadata that differs. False: it must be copied anew
        (its metadata differs, and it has other links)."""
        action, probs, ident = fix_meta(dfd, name, st, dst, xattrs, self.meta)
        if action == "replace":
            return False
        for m in probs:
            self._problem(relpath, "metadata", m)
        if st.st_nlink > 1:
            with self._lock:
                self.targets[relpath] = (ident, False)
        self._count(**{"files_same" if action == "same" else "meta_fixed": 1})
        self._done(action, relpath, st.st_size)
        self.reporter.advance(items=1)
        return True

    def _same_content(self, fd: int, dfd: int, name: bytes, dst: os.stat_result, size: int) -> bool:
        try:
            ofd = open_existing(dfd, name, dst, os.O_RDONLY)
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

    def _stage(self, fd: int, st: os.stat_result, d: _Dir, name: bytes, relpath: bytes,
               dst: os.stat_result | None, xattrs: list[tuple[bytes, bytes]] | None) -> _Staged:
        hasher = blake3.blake3() if self.opts.verify else None
        cancelled = self._cancel.is_set
        if (dst is not None and self.opts.delta and st.st_size >= self.opts.delta_min
                and dst.st_size >= self.opts.delta_min):
            staged = self._stage_delta(fd, st, d, name, relpath, dst, xattrs, hasher)
            if staged is not None:
                return staged
        tmp = self._temp(d.where, name)
        perm = stat.S_IMODE(st.st_mode) & 0o777
        # In a directory this run created (no default ACL, not setgid) a new file gets
        # (euid, egid) and perm & ~umask: then chown and chmod can be skipped.
        same_owner = d.fresh and (st.st_uid, st.st_gid) == self._ids
        same_mode = d.fresh and same_owner and perm == stat.S_IMODE(st.st_mode) and not perm & self._umask
        tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      perm if same_mode else 0o600, dir_fd=d.dfd)
        try:
            written = copy_data(fd, tfd, st, self.buffers, hasher, cancelled)
            self._finish_target(tfd, relpath, st, xattrs, chown=not same_owner, chmod=not same_mode)
            ident = identity(os.fstat(tfd))
        except BaseException:
            os.close(tfd)
            unlink_quiet(d.dfd, tmp)
            raise
        os.close(tfd)
        return _Staged(tmp, "update" if dst is not None else "new", written, ident,
                       hasher.digest() if hasher is not None else None)

    def _stage_delta(self, fd: int, st: os.stat_result, d: _Dir, name: bytes, relpath: bytes,
                     dst: os.stat_result, xattrs: list[tuple[bytes, bytes]] | None,
                     hasher: blake3.blake3 | None) -> _Staged | None:
        """Rewrite only the changed pages: into a clone of the old file, or (--inplace) into
        the old file itself, if DST holds its only link. None: neither is possible here,
        copy the file whole. The old file is the one met in the listing (checked handle)."""
        inplace = self.opts.inplace and single(dst)
        ofd = open_existing(d.dfd, name, dst, os.O_RDONLY)
        tmp: bytes | None = None
        tfd = -1
        try:
            if inplace:
                tfd = open_existing(d.dfd, name, dst, os.O_WRONLY)
            else:
                tmp = self._temp(d.where, name)
                tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                              0o600, dir_fd=d.dfd)
                if not reflink(ofd, tfd):
                    os.close(tfd)
                    tfd = -1
                    unlink_quiet(d.dfd, tmp)
                    self._untemp(d.where, tmp)
                    return None
            res = page_delta(fd, ofd, tfd, st.st_size, dst.st_size, self.buffers, hasher, self._cancel.is_set)
            self._finish_target(tfd, relpath, st, xattrs)
            ident = identity(os.fstat(tfd))
        except BaseException:
            if tmp is not None:
                unlink_quiet(d.dfd, tmp)
            raise
        finally:
            os.close(ofd)
            if tfd >= 0:
                os.close(tfd)
        return _Staged(tmp, "delta", res.written, ident, hasher.digest() if hasher is not None else None,
                       reflinked=not inplace)

    def _finish_target(self, tfd: int, relpath: bytes, st: os.stat_result,
                       xattrs: list[tuple[bytes, bytes]] | None, *, chown: bool = True, chmod: bool = True) -> None:
        for m in self.meta.apply_fd(tfd, st, xattrs, chmod=chmod, chown=chown):
            self._problem(relpath, "metadata", m)
        if self.opts.verify:
            os.fsync(tfd)

    def _install(self, d: _Dir, name: bytes, relpath: bytes, st: os.stat_result, staged: _Staged) -> None:
        dfd = d.dfd
        current = staged.tmp if staged.tmp is not None else name
        if staged.digest is not None:
            n, problem = verify_written(dfd, current, name, staged.ident, st.st_size, staged.digest,
                                        self.buffers.size)
            self._count(bytes_verified=n, files_verified=1)
            if problem is not None:
                if staged.tmp is not None:
                    self._untemp(d.where, staged.tmp)
                self._problem(relpath, "verify", problem, size=st.st_size)
                return
        if staged.tmp is not None:
            try:
                os.rename(staged.tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                unlink_quiet(dfd, staged.tmp)
                raise
            self._untemp(d.where, staged.tmp)
        if st.st_nlink > 1:
            with self._lock:
                self.targets[relpath] = (staged.ident, True)
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
    def _make_links(self) -> None:
        """Each group's names linked to the file installed or kept for it, through a handle
        checked to be that file."""
        groups: dict[bytes, list[bytes]] = {}
        for rel, first in self._links:
            groups.setdefault(first, []).append(rel)
        for first, rels in groups.items():
            if self._cancel.is_set():
                return
            target = self.targets.get(first)
            if target is None:
                for rel in rels:
                    self._problem(rel, "write", f"hard link to {display(first)}, which was not synced")
                continue
            try:
                h, hst = self._link_source(first, rels, target)
            except OSError as exc:
                for rel in rels:
                    self._problem(rel, "write", link_failed(first, exc))
                continue
            try:
                for rel in rels:
                    if self._cancel.is_set():
                        return
                    try:
                        self._link(rel, first, h, hst)
                    except OSError as exc:
                        self._os_problem(rel, exc)
            finally:
                os.close(h)

    def _link_source(self, first: bytes, rels: list[bytes], target: tuple[Identity, bool]) -> tuple[int, os.stat_result]:
        h, hst = link_target(self._droot, first, target[0])
        if target[1] or not needs_copy(self._droot, first, rels, hst):
            return h, hst
        try:
            where: Where = (first.rpartition(b"/")[0], None)
            return detach(self._droot, first, h, lambda n: self._temp(where, n), lambda t: self._untemp(where, t),
                          self.buffers)
        finally:
            os.close(h)

    def _link(self, relpath: bytes, first: bytes, h: int, hst: os.stat_result) -> None:
        where: Where = (relpath.rpartition(b"/")[0], None)
        action = hard_link(self._droot, relpath, h, hst, lambda n: self._temp(where, n),
                           lambda t: self._untemp(where, t), lambda fd, n: self._clear_dir(fd, n, relpath))
        if action == "same":
            self._count(files_same=1)
            self._done("same", relpath, hst.st_size)
        elif action == "hardlink":
            with self._lock:
                self.links_made.add(relpath)
            self._count(hardlinks=1)
            self._done("hardlink", relpath, hst.st_size, note=f"-> {display(first)}")

    def _finish_deferred(self) -> None:
        """Metadata of directories that received hard links, deepest first."""
        have = {d.relpath for d in self._deferred}
        for rel in self._relinked_dirs - have:  # a worker applied it before the link was made
            try:
                sfd = open_dir_path(self._sroot, rel)
            except OSError:
                continue
            try:
                st = os.fstat(sfd)
                xattrs = self.meta.source_xattrs(fd=sfd)
            except OSError:
                continue
            finally:
                os.close(sfd)
            self._deferred.append(_Deferred(rel, st, xattrs, self.dir_ids.get(rel)))
        for d in sorted(self._deferred, key=lambda x: -x.relpath.count(b"/") - bool(x.relpath)):
            try:
                fd = open_dir_path(self._droot, d.relpath)
            except OSError as exc:
                self._os_problem(d.relpath or b".", exc, "metadata")
                continue
            try:
                if d.dident is not None and identity(os.fstat(fd)) != d.dident:
                    self._problem(d.relpath or b".", "changed", "replaced by another directory during the run; "
                                  "its metadata was not set")
                    continue
                self._apply_dir_meta(fd, d.relpath, d.st, d.xattrs)
            finally:
                os.close(fd)


_SPECIAL_COUNTERS = {"same": "files_same", "meta": "meta_fixed", "symlink": "symlinks", "special": "special"}
