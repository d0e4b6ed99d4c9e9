"""The local sync engine: mirror SRC into DST in one process (and its workers), the sender
and receiver connected in-process.

The main thread walks SRC and DST together (local/walk.py), creates directories, symlinks
and special files, deletes extras (--delete) and hands regular files to a pool of copy
threads (local/files.py); subtrees may go to worker processes (local/shards.py). A file is
written under a temp name and renamed into place, so an interrupted run never leaves a
half-written file under a real name. Hard links are made once every file is in place, and
directory metadata last, deepest first (local/dirs.py, local/deferred.py).

Other local users may write in DST while we work. Every operation on DST is relative to a
directory fd opened component by component with O_NOFOLLOW from DST's root, and checked
to be the directory we made or met (dev, ino); entries are changed only through their own
fd or a checked handle (receiver/). SRC and DST are kept apart by identity, bind mounts
included (sync/guard.py).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from deltavault.errors import UsageError
from deltavault.fs.dirfd import Identity, identity, mount_id, open_dir_path
from deltavault.fs.paths import display
from deltavault.progress import NullReporter, Reporter
from deltavault.sync.data import BufferPool
from deltavault.sync.guard import Guard
from deltavault.sync.local.context import LocalRun
from deltavault.sync.local.deferred import DeferredMeta
from deltavault.sync.local.delta import PAGE
from deltavault.sync.local.dirs import Dirs
from deltavault.sync.local.files import Files
from deltavault.sync.local.links import Links
from deltavault.sync.local.pool import ShardPool, ShardResult, SharedFlag, Task
from deltavault.sync.local.shards import Shards, shard_depth
from deltavault.sync.local.walk import Walker
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.root import open_root
from deltavault.sync.report import SyncLog, SyncProblem, SyncResult, SyncStats
from deltavault.workers import BoundedPool

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # SRC's root: the user's path, as given


class Syncer:
    """``cancel``, ``processes``, ``buffers``, ``roots`` and ``guard``: a worker process's
    engine gets its parent's (the roots inherited through fork: the directories the parent
    checked, never looked up again by path)."""

    def __init__(self, src: str | bytes, dst: str | bytes, options: SyncOptions,
                 reporter: Reporter | None = None, log: SyncLog | None = None, *,
                 cancel: Any = None, processes: int | None = None, buffers: BufferPool | None = None,
                 roots: tuple[int, int] | None = None, guard: Guard | None = None) -> None:
        if buffers is None:
            buffers = BufferPool(max(PAGE, -(-options.bufsize // PAGE) * PAGE))
        self.run_state = LocalRun(os.fsencode(src), os.fsencode(dst), options, reporter or NullReporter(), log,
                                  cancel if cancel is not None else threading.Event(), buffers)
        self._processes = options.processes if processes is None else processes
        self._given_roots = roots
        self._guard = guard
        self._links = Links(self.run_state)
        self.workers = 0  # worker processes that synced subtrees

    @property
    def stats(self) -> SyncStats:
        return self.run_state.out.stats

    @property
    def problems(self) -> list[SyncProblem]:
        return self.run_state.out.problems

    @property
    def stopped(self) -> bool:
        return self.run_state.out.stopped

    def partial(self) -> SyncResult:
        """What was done before a run failed."""
        return SyncResult(self.stats, self.problems, self.stopped, self.workers)

    def run(self) -> SyncResult:
        self._open_roots()
        try:
            self._sync(b"", fresh=False, included=not self.run_state.filter.has_includes, top=True)
        finally:
            self.run_state.rx.release_root()  # (a run cut short: the root is not left taken)
            self._close_roots()
        if self.run_state.out.fatal is not None:
            raise self.run_state.out.fatal
        return self.partial()

    def run_subtree(self, relpath: bytes, *, fresh: bool, included: bool,
                    expect: tuple[Identity, Identity] | None = None, seen: list[Identity] | None = None) -> int:
        """Sync SRC/relpath into DST/relpath, which exists (and must be the directories
        ``expect``), leaving that directory's own metadata to the caller. ``seen``: the
        source directories above it (a bind mount of one of them is a loop). Returns how
        many entries it kept."""
        self.run_state.source.entered.update(seen or [])
        self._open_roots()
        try:
            kept = self._sync(relpath, fresh=fresh, included=included, top=False, expect=expect)
        finally:
            self._close_roots()
        if self.run_state.out.fatal is not None:
            raise self.run_state.out.fatal
        return kept

    def _open_roots(self) -> None:
        run = self.run_state
        if self._given_roots is not None:
            run.set_roots(os.dup(self._given_roots[0]), os.dup(self._given_roots[1]), self._guard)
            return
        try:
            sroot = os.open(run.src, _ROOT_FLAGS)
        except OSError:
            raise UsageError(f"source {display(run.src)} is not a directory") from None
        try:
            droot = open_root(run.dst, identity(os.fstat(sroot)), run.src)
        except BaseException:
            os.close(sroot)
            raise
        run.set_roots(sroot, droot, None)
        try:
            self._guard = Guard.local(sroot, droot)
            self._guard.check(run.src, run.dst)
            run.rx.take_root(os.fstat(sroot), run.dst)
        except BaseException:
            self._close_roots()
            raise
        run.set_roots(sroot, droot, self._guard)

    def _close_roots(self) -> None:
        run = self.run_state
        for fd in (run.sroot, run.droot):
            if fd >= 0:
                os.close(fd)
        run.set_roots(-1, -1, self._guard)

    def _sync(self, relpath: bytes, *, fresh: bool, included: bool, top: bool,
              expect: tuple[Identity, Identity] | None = None) -> int:
        run = self.run_state
        try:
            sfd = open_dir_path(run.sroot, relpath)
            try:
                dfd = open_dir_path(run.droot, relpath)
            except BaseException:
                os.close(sfd)
                raise
        except OSError as exc:
            run.out.problem(relpath, "unreadable", exc.strerror or str(exc))
            return 1
        sst, dst = os.fstat(sfd), os.fstat(dfd)
        if expect is not None and (identity(sst), identity(dst)) != expect:
            os.close(sfd)
            os.close(dfd)
            run.out.problem(relpath, "changed", "replaced by another directory during the run; not synced")
            return 1
        deferred = DeferredMeta(run)
        dirs = Dirs(run, deferred)
        shards = self._start_workers(sfd, dirs, deferred) if top and self._processes > 1 else None
        threads = max(1, run.opts.threads)
        pool = BoundedPool(threads, threads * 2, "dv-sync")
        files = Files(run, dirs, pool)
        if top:
            run.out.reporter.start("sync")
        kept = 1
        try:
            root = dirs.enter(None, relpath, sst, sfd, dfd, fresh=fresh, included=included,
                              dident=identity(dst), smnt=mount_id(sfd), dmnt=mount_id(dfd))
            root.dropped = not top  # the caller owns the subtree root's metadata
            run.source.entered.add(root.sident)
            Walker(run, dirs, files, self._links, shards).walk(root)
            kept = root.kept
            files.wait()
            if shards is not None:
                shards.close()
            if not run.cancelled():
                run.rx.make_links()
                deferred.finish(self._links.relinked_dirs, self._links.dir_ids)
        except BaseException:
            run.stop()  # copy threads stop at their next buffer and remove temp files
            pool.shutdown(cancel_futures=True)
            if shards is not None:
                shards.close()  # workers see the event, clean up and return
            run.rx.temps.remove_all(run.droot)
            raise
        finally:
            pool.shutdown(cancel_futures=True)
            dirs.close_all()
            if run.cancelled():
                run.rx.temps.remove_all(run.droot)
            if top:
                run.out.reporter.finish()
        return kept

    def _start_workers(self, sfd: int, dirs: Dirs, deferred: DeferredMeta) -> Shards | None:
        """Worker processes for the subtrees at the shallowest depth that has enough of them
        (None: too few). Forked now, while this process has a single thread; they inherit
        the roots and share a cancel event with it."""
        run = self.run_state
        depth = shard_depth(sfd, self._processes, run.filter.excluded)
        if depth is None:
            return None
        run.cancel = SharedFlag()  # no lock a killed worker could leave held (local/pool.py)
        pool = ShardPool(self._processes, self._subtree, run.opts.bufsize, run.out.log, run.out.reporter)
        self.workers = self._processes
        return Shards(run, dirs, self._links, deferred, pool, depth)

    def _subtree(self, task: Task, reporter: Reporter, buffers: BufferPool, log: SyncLog | None) -> ShardResult:
        """In a worker process: sync one subtree with an engine of its own."""
        run = self.run_state
        relpath, fresh, included, expect, seen = task
        s = Syncer(run.src, run.dst, run.opts, reporter, log, cancel=run.cancel, processes=1, buffers=buffers,
                   roots=(run.sroot, run.droot), guard=self._guard)
        try:
            kept = s.run_subtree(relpath, fresh=fresh, included=included, expect=expect, seen=seen)
            fatal = None
        except Exception as exc:  # NoSpace, or a bug: the main process reports it
            kept, fatal = 1, f"{type(exc).__name__}: {exc}"
        return s.shard_result(kept, fatal)

    def shard_result(self, kept: int, fatal: str | None) -> ShardResult:
        run = self.run_state
        groups = run.rx.groups
        return ShardResult(self.stats, self.problems, self.stopped, fatal, kept, self._links.groups(),
                           groups.copies, groups.made, groups.targets, self._links.dir_ids)
