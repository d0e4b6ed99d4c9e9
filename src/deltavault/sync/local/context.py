"""What the parts of one local sync share: the options, the two roots, the cancel event,
the outcomes, and the two sides (sender/source.py reads SRC, receiver/core.py writes DST),
connected here in one process."""

from __future__ import annotations

import os
from typing import Any

from deltavault.errors import NO_SPACE_ERRNOS, NoSpace
from deltavault.fs.paths import display
from deltavault.progress import Reporter
from deltavault.sync.data import BufferPool
from deltavault.sync.filters import Filter
from deltavault.sync.guard import Guard
from deltavault.sync.local.ntfs import LocalNtfs
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.core import Receiver
from deltavault.sync.report import Outcomes, SyncLog
from deltavault.sync.sender.source import SourceTree


class LocalOutcomes(Outcomes):
    """A full destination ends a local run: ``fatal`` is raised once everything stopped."""

    def __init__(self, run: LocalRun, reporter: Reporter, log: SyncLog | None) -> None:
        super().__init__(reporter, log, stop_on_error=run.opts.stop_on_error, stop=run.stop)
        self.fatal: NoSpace | None = None
        self._run = run

    def os_problem(self, rel: bytes, exc: OSError, kind: str = "write") -> None:
        if exc.errno in NO_SPACE_ERRNOS:
            self.no_space(rel)
        else:
            super().os_problem(rel, exc, kind)

    def no_space(self, rel: bytes, message: str | None = None) -> None:
        """DST is full (``message``: as a worker process said it)."""
        with self.lock:
            if self.fatal is None:
                self.fatal = NoSpace(message or f"the destination {display(self._run.dst)} is full "
                                     f"(while writing {display(rel or b'.')}); files already synced are complete")
        if message is None:
            self.problem(rel, "write", "no space left on the destination")
        self._run.stop()


class LocalRun:
    """``cancel``: a threading.Event, or a SharedFlag (local/pool.py) shared with worker processes
    (it is replaced when they are started, before the walk: read it here, never keep it
    from before)."""

    def __init__(self, src: bytes, dst: bytes, opts: SyncOptions, reporter: Reporter, log: SyncLog | None,
                 cancel: Any, buffers: BufferPool) -> None:
        self.src, self.dst, self.opts = src, dst, opts
        self.cancel = cancel
        self.out = LocalOutcomes(self, reporter, log)
        self.filter = Filter(opts.excludes, opts.includes, default_excludes=opts.default_excludes)
        self.meta = MetaPolicy(opts)
        self.buffers = buffers
        self.source = SourceTree(self.filter, self.meta, self.out)
        self.rx = Receiver(opts, self.meta, self.out, buffers, self.filter, cancelled=self.cancelled)
        self.sroot = self.droot = -1  # the roots, open for the whole run
        self.ntfs: LocalNtfs | None = None  # SRC on ntfs-3g, with --acl or --streams
        self.ids = (os.geteuid(), os.getegid())
        self.umask = os.umask(0o022)  # (read while this process has one thread: it is process-wide)
        os.umask(self.umask)

    def cancelled(self) -> bool:
        return bool(self.cancel.is_set())

    def stop(self) -> None:
        """Copy threads stop at their next buffer, worker processes at their next entry."""
        self.cancel.set()

    def set_roots(self, sroot: int, droot: int, guard: Guard | None) -> None:
        self.sroot, self.droot = sroot, droot
        self.rx.root = droot
        self.ntfs = LocalNtfs.open(sroot, droot, self.opts, self.buffers, self.cancelled)
        self.meta.stream_xattrs = self.ntfs is not None and self.ntfs.xattr_streams
        self.source.guard = self.rx.guard = guard
