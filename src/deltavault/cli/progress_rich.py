"""Progress bars on a terminal (rich). Imported only for a terminal: rich's import, 25 to
50 ms, is otherwise on every command's path (a restore's, after the key is derived)."""

from __future__ import annotations

import threading
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

from deltavault.cli.units import clock, human
from deltavault.fs.paths import one_line


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

    # A background thread (the totals of a restore, a backup's scan) may still report after
    # finish: the check of _progress and its use hold _lock, as finish's clearing of it does.
    # Before, such a report in between died on None (test_progress_threads.py).
    def start(self, phase: str, *, total_bytes: int | None = None, total_items: int | None = None) -> None:
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), FilesColumn(), BytesColumn(), SpeedColumn(),
            TimeColumn(), console=self.console, transient=True)
        task = progress.add_task(phase, total=total_bytes, files=0, files_total=total_items)
        with self._lock:
            self._files = 0
            self._progress, self._task = progress, task
        progress.start()

    def set_totals(self, *, total_bytes: int | None = None, total_items: int | None = None) -> None:
        with self._lock:
            if self._progress is None or self._task is None:
                return
            if total_bytes is not None:
                self._progress.update(self._task, total=total_bytes)
            if total_items is not None:
                self._progress.update(self._task, files_total=total_items)

    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
        with self._lock:
            if self._progress is None or self._task is None:
                return
            self._files += items
            self._progress.update(self._task, advance=nbytes, files=self._files)

    def problem(self, path: str, kind: str, message: str) -> None:
        # Text, not markup: a name holding "[/x]" raised MarkupError, "[link=URL]" made a link.
        self.console.print(Text.assemble((kind, "yellow"), f": {one_line(path)}: {one_line(message)}"),
                           highlight=False)

    def finish(self) -> None:
        with self._lock:
            progress, self._progress = self._progress, None
        if progress is not None:
            progress.stop()
