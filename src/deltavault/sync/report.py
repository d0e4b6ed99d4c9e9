"""Outcomes of a sync: counters, problems, and the per-file log."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields

from deltavault.fs.paths import display


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
        err = (error or "-").replace("\t", " ").replace("\n", " ")
        line = "\t".join([stamp, action, str(size), str(written), digest.hex() if digest else "-",
                          display(relpath), err]) + "\n"
        os.write(self._fd, line.encode("utf-8", "backslashreplace"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
