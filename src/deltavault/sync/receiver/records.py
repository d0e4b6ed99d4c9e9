"""The agent's outcomes: reported and logged where it runs, as every run's are, and also
sent back to the sender as records with the next reply (sync/wire.py)."""

from __future__ import annotations

import errno
from typing import Any

from deltavault.errors import NO_SPACE_ERRNOS
from deltavault.fs.paths import display
from deltavault.progress import Reporter
from deltavault.sync.report import Outcomes, SyncLog


class AgentOutcomes(Outcomes):
    """The agent's outcomes also go back to the sender, as records with the next reply;
    a full or read-only disk ends the run (``fatal``)."""

    def __init__(self, reporter: Reporter, log: SyncLog | None) -> None:
        super().__init__(reporter, log)  # the sender decides about --stop-on-error
        self.records: list[list[Any]] = []
        self.fatal: str | None = None

    def problem(self, rel: bytes, kind: str, message: str, *, size: int = 0) -> None:
        self.records.append(["error", rel, size, 0, None, kind, message])
        super().problem(rel, kind, message, size=size)

    def done(self, action: str, rel: bytes, size: int = 0, *, written: int = 0, digest: bytes | None = None,
             note: str | None = None) -> None:
        self.records.append([action, rel, size, written, digest, None, note])
        super().done(action, rel, size, written=written, digest=digest, note=note)

    def note(self, rel: bytes, message: str) -> None:
        self.records.append(["note", rel, 0, 0, None, None, message])
        super().note(rel, message)

    def os_problem(self, rel: bytes, exc: OSError, kind: str = "write") -> None:
        if exc.errno not in NO_SPACE_ERRNOS and exc.errno != errno.EROFS:
            super().os_problem(rel, exc, kind)
            return
        what = "full" if exc.errno in NO_SPACE_ERRNOS else "read-only"
        self.problem(rel, kind, "no space left on the destination" if what == "full" else exc.strerror or str(exc))
        if self.fatal is None:
            self.fatal = f"{what}: the destination is {what} (while writing {display(rel or b'.')}); " \
                         "files already synced are complete"
