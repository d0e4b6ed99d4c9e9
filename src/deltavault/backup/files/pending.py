"""Content being stored: the references of a file whose chunks are still on the workers.

Small chunks travel to the workers in batches (one task, one event for many chunks); a
``PendingContent`` holds Futures and batch ``Slot``s until they resolve into references.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from deltavault.backup.files.pagedigests import Answer
from deltavault.model.content import ContentRef


class Batch:
    """Small chunks sent to the workers as one task, with one event for all of them."""

    __slots__ = ("done_event", "error", "items", "results")

    def __init__(self) -> None:
        self.items: list[bytes | memoryview] = []
        self.results: list[ContentRef] = []
        self.error: BaseException | None = None
        self.done_event = threading.Event()


class Slot:
    """One chunk's place in a batch: a much lighter stand-in for a Future."""

    __slots__ = ("batch", "i")

    def __init__(self, batch: Batch, i: int) -> None:
        self.batch, self.i = batch, i

    def done(self) -> bool:
        return self.batch.done_event.is_set()

    def result(self) -> ContentRef:
        self.batch.done_event.wait()
        if self.batch.error is not None:
            raise self.batch.error
        return self.batch.results[self.i]


@dataclass
class PendingContent:
    parts: list[ContentRef | Future[ContentRef] | Slot] = field(default_factory=list)
    # Ids of the page-digest META segments: saved here (delta path) or by the helper process,
    # which also returns its content hash of the file; kept only if it equals
    # ``content_hash`` of our own read.
    pages: list[bytes] | Future[Answer | None] | None = None
    content_hash: bytes | None = None
    bytes_read: int = 0
    _settled: int = 0  # parts before this index are plain references

    def compact(self) -> None:
        """Replace the finished parts by their references: a 100 GiB file has hundreds of
        thousands of chunks, and a Future weighs about ten times its reference."""
        parts = self.parts
        i = self._settled
        while i < len(parts):
            p = parts[i]
            if isinstance(p, Future):
                if not p.done() or p.exception() is not None:
                    break
                parts[i] = p.result()
            elif isinstance(p, Slot):
                if not p.done() or p.batch.error is not None:
                    break
                parts[i] = p.result()
            i += 1
        self._settled = i

    def refs(self) -> list[ContentRef]:
        return [p.result() if isinstance(p, (Future, Slot)) else p for p in self.parts]

    def page_ids(self) -> list[bytes] | None:
        """The page-digest segment ids, or None when there are none (or the helper could
        not vouch for them): the file is then stored whole by its next change."""
        d = self.pages
        if not isinstance(d, Future):
            return d
        try:
            res = d.result()
        except Exception:  # a dead helper process only costs digests
            return None
        if res is None or res[1] != self.content_hash:
            return None  # the helper read other bytes than we stored
        return res[0]

    def done(self) -> bool:
        """Every chunk and the page digests are stored: the file's node can be finished."""
        return all(getattr(x, "done", lambda: True)() for x in self.parts) and (
            not isinstance(self.pages, Future) or self.pages.done())
