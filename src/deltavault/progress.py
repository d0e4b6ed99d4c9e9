"""Progress reporting contract. Engines call a Reporter; only the CLI renders it."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    wants_totals: bool

    def start(self, phase: str, *, total_bytes: int | None = None, total_items: int | None = None) -> None: ...

    def set_totals(self, *, total_bytes: int | None = None, total_items: int | None = None) -> None: ...

    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None: ...

    def problem(self, path: str, kind: str, message: str) -> None: ...

    def finish(self) -> None: ...


class NullReporter:
    wants_totals = False

    def start(self, phase: str, *, total_bytes: int | None = None, total_items: int | None = None) -> None:
        pass

    def set_totals(self, *, total_bytes: int | None = None, total_items: int | None = None) -> None:
        pass

    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
        pass

    def problem(self, path: str, kind: str, message: str) -> None:
        pass

    def finish(self) -> None:
        pass
