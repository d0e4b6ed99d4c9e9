"""What a file restore is asked to do (options, the chosen paths) and what it reports."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from deltavault.fs.paths import display
from deltavault.progress import Reporter


@dataclass
class RestoreOptions:
    include: list[str] = field(default_factory=list)  # patterns (fs.patterns); empty = all
    exclude: list[str] = field(default_factory=list)  # patterns: not restored, nor what is below
    paths: list[str] = field(default_factory=list)  # the snapshot's paths (patterns may name them)
    overwrite: str = "always"  # existing.OVERWRITE: what to do with an entry already there
    delete: bool = False  # remove what the target has and the snapshot does not
    verify: bool = False
    owner: bool = True  # chown (effective only as root)
    workers: int = 3
    special: bool = True  # False (--no-special): device nodes and FIFOs are skipped
    setuid: bool = True  # False (--no-setuid): setuid and setgid bits of files are cleared


@dataclass
class RestoreProblem:
    path: str
    kind: str  # corrupt | write | metadata | verify | missing | delete
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
    skipped: int = 0  # entries already in the target and left there (--overwrite)
    deleted: int = 0  # entries removed because the snapshot does not have them (--delete)
    ntfs_not_kept: int = 0  # NTFS metadata items the target could not keep (one warning says which)


class RestoreLog:
    """Problems (each told to the reporter as it happens) and counts; thread-safe, since the
    walker and the workers both report."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.problems: list[RestoreProblem] = []
        self.warnings: list[RestoreProblem] = []  # said, but not problems: the restore is not partial
        self.stats = RestoreStats()
        self._lock = threading.Lock()

    def problem(self, path: bytes, kind: str, message: str) -> None:
        p = RestoreProblem(display(path), kind, message)
        with self._lock:
            self.problems.append(p)
        self.reporter.problem(p.path, kind, message)

    def warn(self, path: bytes, message: str) -> None:
        p = RestoreProblem(display(path), "warning", message)
        with self._lock:
            self.warnings.append(p)
        self.reporter.problem(p.path, p.kind, message)

    def count(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)
