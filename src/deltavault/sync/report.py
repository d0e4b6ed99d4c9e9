"""Outcomes of a sync: counters, problems, the per-file log, and ``Outcomes``, which every
part of a run (sender, receiver, local engine) reports through."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from deltavault.fs.paths import display, one_line
from deltavault.progress import Reporter


@dataclass
class SyncProblem:
    path: str
    kind: str  # unreadable | vanished | changed | write | metadata | verify | delete | skipped
    message: str


@dataclass
class SyncStats:
    files_new: int = 0
    files_updated: int = 0  # copied whole over an older version
    files_delta: int = 0  # changed pages rewritten only
    files_same: int = 0
    meta_fixed: int = 0  # content equal, metadata corrected
    dirs_created: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    special: int = 0
    deleted: int = 0
    bytes_copied: int = 0  # written by whole-file copies
    delta_bytes_written: int = 0  # written by delta updates
    delta_file_bytes: int = 0  # total size of the files updated by delta
    delta_reflinked: int = 0  # delta files whose unchanged blocks were shared by a clone
    delta_wire_bytes: int = 0  # remote delta: file bytes that crossed the network
    bytes_verified: int = 0
    files_verified: int = 0
    ntfs_not_kept: int = 0  # files whose NTFS metadata or streams DST could not keep (named in the log)

    def add(self, other: SyncStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def bytes_written(self) -> int:
        return self.bytes_copied + self.delta_bytes_written


class SyncLog:
    """One tab-separated line per entry: time, action, size, bytes written, BLAKE3 (with
    --verify) or -, path (control characters and undecodable bytes escaped), note or error or -.

    Each line is one O_APPEND write, so worker processes can share the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, action: str, size: int, relpath: bytes, *, written: int = 0,
              digest: bytes | None = None, error: str | None = None) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        err = one_line(error or "-")  # a tab, newline or CR would split or forge an entry
        line = "\t".join([stamp, action, str(size), str(written), digest.hex() if digest else "-",
                          display(relpath), err]) + "\n"
        os.write(self._fd, line.encode("utf-8", "backslashreplace"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class SyncResult:
    stats: SyncStats
    problems: list[SyncProblem] = field(default_factory=list)
    stopped: bool = False  # --stop-on-error ended the run early
    workers: int = 0  # worker processes that synced subtrees (0: all in this process)
    wire: tuple[int, int] | None = None  # a sync with another host: bytes sent and received over ssh
    warnings: list[str] = field(default_factory=list)  # said once each, at the end (not problems: exit 0)


# Actions that are no entry of SRC done: not counted as progress.
_NOT_PROGRESS = frozenset({"delete", "mkdir", "skip"})


class Outcomes:
    """What a run did, as it happens: counters, problems, log lines and progress. Thread-safe
    (copy threads report too). Under --stop-on-error (``stop_on_error``) the first problem
    that is not "skipped" sets ``stopped`` and calls ``stop``."""

    def __init__(self, reporter: Reporter, log: SyncLog | None, *, stop_on_error: bool = False,
                 stop: Callable[[], None] | None = None) -> None:
        self.stats = SyncStats()
        self.problems: list[SyncProblem] = []
        self.reporter = reporter
        self.log = log
        self.stopped = False
        self.lock = threading.Lock()
        self._stop_on_error = stop_on_error
        self._stop = stop

    def problem(self, rel: bytes, kind: str, message: str, *, size: int = 0) -> None:
        p = SyncProblem(display(rel or b"."), kind, message)
        with self.lock:
            self.problems.append(p)
        self.reporter.problem(p.path, kind, message)
        if self.log is not None:
            self.log.write("error", size, rel or b".", error=f"{kind}: {message}")
        if self._stop_on_error and kind != "skipped":
            self.stopped = True
            if self._stop is not None:
                self._stop()

    def os_problem(self, rel: bytes, exc: OSError, kind: str = "write") -> None:
        """A failed system call; subclasses make a full disk end the run."""
        self.problem(rel, kind, exc.strerror or str(exc))

    def done(self, action: str, rel: bytes, size: int = 0, *, written: int = 0, digest: bytes | None = None,
             note: str | None = None) -> None:
        """An entry done: a log line (``note`` in its last field), and progress."""
        if self.log is not None:
            self.log.write(action, size, rel, written=written, digest=digest, error=note)
        if action in ("new", "update", "delta"):
            self.reporter.advance(nbytes=size, items=1, current=display(rel))
        elif action not in _NOT_PROGRESS:
            self.reporter.advance(items=1)

    def note(self, rel: bytes, message: str) -> None:
        """A log line about an entry already done (action ``note``); no progress."""
        if self.log is not None:
            self.log.write("note", 0, rel or b".", error=message)

    def count(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def merge(self, stats: SyncStats, problems: list[SyncProblem], stopped: bool) -> None:
        """What another process of the same run did (already reported and logged there)."""
        with self.lock:
            self.stats.add(stats)
            self.problems.extend(problems)
            self.stopped = self.stopped or stopped
