"""What the object layer and the engines need of a repository, as protocols.

``Repository`` satisfies all of them; tests and tools pass smaller stand-ins. Engines
name the narrowest one they use, so a reader sees at a glance what an engine can do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from deltavault.model.types import BlobType


class BlobLoader(Protocol):
    def load_blob(self, blob_id: bytes) -> bytes: ...


class BlobSizes(Protocol):
    def blob_size(self, blob_id: bytes) -> int | None:
        """The blob's length as the index records it (its plaintext's), None if not indexed."""
        ...


class BlobReader(BlobLoader, BlobSizes, Protocol):
    """Reads many blobs at once (restore) and checks bytes against their id."""

    def blob_id(self, data: bytes | memoryview) -> bytes: ...

    def load_blobs(self, ids: list[bytes]) -> Iterator[tuple[bytes, bytes]]: ...

    def hold_blobs(self, ids: list[bytes], *, wait: bool = False) -> Callable[[], None]:
        """A hint: these blobs will be loaded soon (a backend that can, starts reading them,
        and keeps them until the returned function is called). ``wait``: the caller may be
        held back while the backend holds too much (its holds are released by others)."""
        ...


class BlobSaver(Protocol):
    def save_blob(self, btype: BlobType, data: bytes | memoryview, *, blob_id: bytes | None = None,
                  level: int | None = None, compress: bool = True) -> tuple[bytes, int]: ...

    def has_blob(self, blob_id: bytes) -> bool: ...


def save_many(repo: BlobSaver, btype: BlobType, items: Sequence[bytes | memoryview]) -> list[tuple[bytes, int]]:
    """``save_blob`` of each item, in one call where the store has one (``save_blobs``:
    the repository seals and packs them together, see repository/blobs.py)."""
    many = getattr(repo, "save_blobs", None)
    if many is not None:
        return many(btype, items)  # type: ignore[no-any-return]
    return [repo.save_blob(btype, x) for x in items]
