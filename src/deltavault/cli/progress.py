"""Reporters: JSON lines with --json, errors only otherwise (rich bars on a terminal:
progress_rich.py)."""

from __future__ import annotations

import json
import threading
import time
from typing import IO, Any

from deltavault.fs.paths import one_line
from deltavault.progress import NullReporter


class JsonReporter:
    """Progress as JSON lines, at most one status line a second."""

    wants_totals = False

    def __init__(self, stream: IO[str], interval: float = 1.0) -> None:
        self.stream = stream
        self.interval = interval
        self.phase = ""
        self.nbytes = 0
        self.items = 0
        self.total_bytes: int | None = None
        self.total_items: int | None = None
        self._last = 0.0
        self._t0 = time.monotonic()
        self._lock = threading.Lock()

    def _write(self, obj: dict[str, Any]) -> None:
        self.stream.write(json.dumps(obj) + "\n")
        self.stream.flush()

    def start(self, phase: str, *, total_bytes: int | None = None, total_items: int | None = None) -> None:
        self.phase, self.total_bytes, self.total_items = phase, total_bytes, total_items
        self._t0 = time.monotonic()

    def set_totals(self, *, total_bytes: int | None = None, total_items: int | None = None) -> None:
        self.total_bytes = total_bytes if total_bytes is not None else self.total_bytes
        self.total_items = total_items if total_items is not None else self.total_items

    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
        with self._lock:
            self.nbytes += nbytes
            self.items += items
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._write({"type": "status", "phase": self.phase, "bytes_done": self.nbytes,
                             "files_done": self.items, "total_bytes": self.total_bytes,
                             "total_files": self.total_items, "seconds": round(now - self._t0, 2)})

    def problem(self, path: str, kind: str, message: str) -> None:
        with self._lock:
            self._write({"type": "problem", "kind": kind, "path": path, "message": message})

    def finish(self) -> None:
        pass


class QuietReporter(NullReporter):
    """Not a terminal and not --json: only problems, on stderr."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def problem(self, path: str, kind: str, message: str) -> None:
        self.stream.write(f"{kind}: {one_line(path)}: {one_line(message)}\n")
