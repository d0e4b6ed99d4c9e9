"""The sender's end of the connection to the agent: frames read by their own thread
(sync/wire.py ``Duplex``), a connection that ends as ``Lost``, and each reply's records
(what the agent did) taken in: its problems reported and logged here, its other outcomes
logged. A reply that says the agent's disk is full or read-only, or a problem under
--stop-on-error, ends the walk (``Stop``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deltavault.sync.remote import Loader, serve
from deltavault.sync.report import Outcomes
from deltavault.sync.wire import Duplex, Frames


class Lost(Exception):
    """The connection to the agent ended."""


class Stop(Exception):
    """The agent's destination is full or read-only, or --stop-on-error."""


class AgentLink:
    def __init__(self, chan: Duplex, out: Outcomes) -> None:
        self.chan, self.out = chan, out
        self.fatal: str | None = None  # the agent's: "full: ..." or "read-only: ..."

    def send(self, obj: Any) -> None:
        try:
            self.chan.send(obj)
        except (BrokenPipeError, ConnectionError) as exc:
            raise Lost from exc

    def request(self, obj: dict[str, Any]) -> int:
        """Send a request that has a reply; returns the id to wait for."""
        try:
            return self.chan.request(obj)
        except (BrokenPipeError, ConnectionError) as exc:
            raise Lost from exc

    def reply(self, rid: int, *, stop: bool = True) -> dict[str, Any]:
        """The reply to a request, its outcomes taken in; Stop (unless ``stop`` is False)
        when the agent's disk cannot take more or --stop-on-error has stopped the run."""
        try:
            rep: dict[str, Any] = self.chan.reply(rid)
        except (EOFError, ConnectionError) as exc:
            raise Lost from exc
        self._absorb(rep)
        if rep.get("fatal") and self.fatal is None:
            self.fatal = rep["fatal"]
        if stop and (self.fatal is not None or self.out.stopped):
            raise Stop
        return rep

    def serve(self, load: Loader) -> None:
        """Answer the agent's remote-delta requests for one file until it says "bye"."""
        try:
            serve(self.chan, load)
        except (BrokenPipeError, ConnectionError) as exc:
            raise Lost from exc

    def serve_streams(self, answer: Callable[[Frames], bool]) -> bool:
        """Answer the agent's requests for one file's NTFS streams (sender/ntfs.py) until it
        says "bye"; False when the file changed meanwhile."""
        try:
            return answer(self.chan)
        except (BrokenPipeError, ConnectionError, EOFError) as exc:
            raise Lost from exc

    def _absorb(self, rep: dict[str, Any]) -> None:
        for action, rel, size, written, digest, kind, message in rep.get("records", []):
            if action == "error":
                self.out.problem(rel, kind, message, size=size)
            elif self.out.log is not None:  # (message: a note, what DST could not keep of NTFS's metadata)
                self.out.log.write(action, size, rel, written=written, digest=digest, error=message)
