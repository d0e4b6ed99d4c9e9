"""What a file backup is asked to do and what it reports: options, sources, exclusions,
problems and counts. Shared by the archiver, its parts and the run."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from deltavault.fs.dirfd import open_regular
from deltavault.fs.paths import display
from deltavault.fs.patterns import PatternSet, components
from deltavault.model.types import BlobType
from deltavault.progress import Reporter
from deltavault.workers import DEFAULT_BUFFER_MEMORY

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
    # Of those unmodified or changed: read again only because their timestamps fell in the
    # racy window (RACY_NS), so their stat data could not prove them unchanged.
    files_reread: int = 0
    dirs: int = 0
    bytes_read: int = 0
    bytes_total: int = 0


@dataclass
class Source:
    path: bytes  # where to read (maybe inside a snapshot)
    name: bytes  # name at the snapshot root
    # Its original path (what --exclude patterns are matched against); "" means ``path``.
    logical: bytes = b""
    # Snapshot paths (name/...) to keep, when several sources share this entry (fs.sources):
    # only they, what is below them and the directories leading to them are walked.
    only: set[bytes] | None = None


@dataclass
class FileBackupOptions:
    excludes: list[str] = field(default_factory=list)
    iexcludes: list[str] = field(default_factory=list)  # matched ignoring case
    exclude_if_present: list[str] = field(default_factory=list)  # NAME or NAME:HEADER
    exclude_caches: bool = False
    exclude_larger_than: int | None = None
    one_file_system: bool = False
    read_all: bool = False
    delta_threshold: int = DEFAULT_DELTA_THRESHOLD
    workers: int = 0
    # Bytes of file data read but not yet stored (chunks queued for the workers, and the read
    # windows they are views of): the main term of a backup's memory (--buffer-memory).
    buffer_memory: int = DEFAULT_BUFFER_MEMORY
    # Entries whose ctime falls this close to the previous run's start are re-read. 2 s
    # covers file systems with 2-second timestamps (FAT); tests shorten it.
    racy_window_ns: int = RACY_NS
    # e.g. the repository itself; matched by identity (st_dev, st_ino) of what each path
    # names when the run starts, so another path to it (a bind mount, a symlink) is skipped too
    skip_paths: set[bytes] = field(default_factory=set)
    # Told each regular file's fate as it is decided (--list): its path and "A" (new),
    # "M" (modified) or "U" (unmodified).
    on_file: Callable[[bytes, str], None] | None = None


# The CACHEDIR.TAG convention (https://bford.info/cachedir/): a directory holding this file,
# starting with this line, is a cache (--exclude-caches).
CACHEDIR_TAG = "CACHEDIR.TAG:Signature: 8a477f597d28d172789f06886806bc55"


class Excludes:
    """What a file backup leaves out: ``--exclude``/``--iexclude`` patterns (fs.patterns,
    matched against an entry's original path), files over ``--exclude-larger-than``, and the
    contents of directories marked by ``--exclude-if-present NAME[:HEADER]`` (or
    ``--exclude-caches``). The archiver and the size scanner behind the progress bar both
    ask here."""

    def __init__(self, opts: FileBackupOptions) -> None:
        self.patterns = PatternSet(opts.excludes, ignore_case=opts.iexcludes)
        self.larger_than = opts.exclude_larger_than
        markers = [*opts.exclude_if_present, *([CACHEDIR_TAG] if opts.exclude_caches else [])]
        self.markers: list[tuple[bytes, bytes]] = []
        for m in markers:
            name, _, header = m.partition(":")
            self.markers.append((os.fsencode(name), header.encode()))

    def __call__(self, path: bytes, name: bytes = b"") -> bool:
        """The entry at ``path`` (its original, absolute path) is excluded by a pattern."""
        return bool(self.patterns) and self.patterns.matches(components(path))

    def too_large(self, st: os.stat_result) -> bool:
        return self.larger_than is not None and stat.S_ISREG(st.st_mode) and st.st_size > self.larger_than

    def marker(self, dir_fd: int, names: list[bytes]) -> bytes | None:
        """The marker file that makes the directory ``dir_fd`` (entries ``names``) excluded."""
        for name, header in self.markers:
            if name in names and (not header or _starts_with(dir_fd, name, header)):
                return name
        return None


def _starts_with(dir_fd: int, name: bytes, header: bytes) -> bool:
    try:
        fd = open_regular(dir_fd, name)
    except OSError:
        return False
    try:
        return os.pread(fd, len(header), 0) == header
    except OSError:
        return False
    finally:
        os.close(fd)


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
