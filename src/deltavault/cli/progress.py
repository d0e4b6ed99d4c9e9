"""Reporters: rich bars on a terminal, JSON lines with --json, errors only otherwise."""

from __future__ import annotations

import json
import threading
import time
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

from deltavault.cli.units import clock, human
from deltavault.progress import NullReporter


class FilesColumn(ProgressColumn):
    """Files done, of the total once it is known: ``412/1,024 files``."""

    def render(self, task: Task) -> Text:
        done, total = task.fields.get("files", 0), task.fields.get("files_total")
        return Text(f"{done:,}/{total:,} files" if total is not None else f"{done:,} files", style="cyan")


class BytesColumn(ProgressColumn):
    """Bytes done, of the total once it is known, in binary units: ``195.4 KiB/57.4 MiB``."""

    def render(self, task: Task) -> Text:
        done = human(task.completed)
        return Text(f"{done}/{human(task.total)}" if task.total is not None else done, style="green")


class SpeedColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{human(speed)}/s" if speed else "", style="red")


class TimeColumn(ProgressColumn):
    """Time so far, and the ETA once there is a total to estimate against."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        text = clock(elapsed or 0)
        if task.total is not None and not task.finished:
            left = task.time_remaining
            text += f", eta {clock(left)}" if left is not None else ", eta ?"
        return Text(text, style="yellow")


class RichReporter:
    """One bar per phase: its description, the bar, files and bytes each in their own column
    (done/total in human units), the speed, and the time with an ETA."""

    wants_totals = True

    def __init__(self, stream: IO[str]) -> None:
        self.console = Console(file=stream)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._files = 0
        self._lock = threading.Lock()

    def start(self, phase: str, *, total_bytes: int | None = None, total_items: int | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), FilesColumn(), BytesColumn(), SpeedColumn(),
            TimeColumn(), console=self.console, transient=True)
        self._files = 0
        self._task = self._progress.add_task(phase, total=total_bytes, files=0, files_total=total_items)
        self._progress.start()

    def set_totals(self, *, total_bytes: int | None = None, total_items: int | None = None) -> None:
        if self._progress is None or self._task is None:
            return
        with self._lock:
            if total_bytes is not None:
                self._progress.update(self._task, total=total_bytes)
            if total_items is not None:
                self._progress.update(self._task, files_total=total_items)

    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
        if self._progress is None or self._task is None:
            return
        with self._lock:
            self._files += items
            self._progress.update(self._task, advance=nbytes, files=self._files)

    def problem(self, path: str, kind: str, message: str) -> None:
        self.console.print(f"[yellow]{kind}[/]: {path}: {message}", markup=True, highlight=False)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


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
        self.stream.write(f"{kind}: {path}: {message}\n")
