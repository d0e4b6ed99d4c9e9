"""Blob types, stored in pack headers and index entries."""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

from deltavault.errors import UsageError


class BlobType(IntEnum):
    DATA = 0  # file or volume content
    TREE = 1  # directory listings (Merkle tree nodes)
    META = 2  # page digests, block maps, file-system metadata digests


ID_LEN = 32


def match_prefix(ids: Iterable[str], ref: str, what: str) -> str:
    """The one id that starts with ``ref``: how users name snapshots and keys."""
    hits = [i for i in ids if i.startswith(ref)]
    if not hits:
        raise UsageError(f"no {what} matches {ref!r}")
    if len(hits) > 1:
        raise UsageError(f"{what} prefix {ref!r} is ambiguous ({len(hits)} matches)")
    return hits[0]
