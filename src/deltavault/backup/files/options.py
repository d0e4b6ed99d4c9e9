"""What a file backup is asked to do and what it reports: options, sources, exclusions,
problems and counts. Shared by the archiver, its parts and the run."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Protocol

from deltavault.fs.paths import display
from deltavault.model.types import BlobType
from deltavault.progress import Reporter

# A file whose ctime is this close to the previous run's start may have changed again
# within the same timestamp tick after it was read ("racy" entries, as in git).
RACY_NS = 2_000_000_000
DEFAULT_DELTA_THRESHOLD = 32 * 1024 * 1024


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


class Excludes:
    """``--exclude`` patterns (fnmatch), matched against an entry's name and its full path.
    The archiver and the size scanner behind the progress bar both ask here."""

    def __init__(self, patterns: list[str] | list[bytes]) -> None:
        self.patterns = [p.encode() if isinstance(p, str) else p for p in patterns]

    def __call__(self, path: bytes, name: bytes) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in self.patterns)


class RunLog:
    """The problems of a run, each told to the reporter as it happens, and its counts."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.problems: list[Problem] = []
        self.stats = FileStats()

    def problem(self, path: bytes, kind: str, message: str, *, partial: bool = True) -> None:
        p = Problem(display(path), kind, message, partial)
        self.problems.append(p)
        self.reporter.problem(p.path, kind, message)

    def os_problem(self, path: bytes, exc: OSError, what: str = "") -> None:
        if isinstance(exc, FileNotFoundError):
            self.problem(path, "vanished", "disappeared before it could be read")
        else:
            self.problem(path, "unreadable", what + (exc.strerror or str(exc)))
