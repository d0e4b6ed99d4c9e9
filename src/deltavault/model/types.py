"""Blob types, stored in pack headers and index entries."""

from __future__ import annotations

from enum import IntEnum


class BlobType(IntEnum):
    DATA = 0  # file or volume content
    TREE = 1  # directory listings (Merkle tree nodes)
    META = 2  # page digests, block maps, file-system metadata digests


ID_LEN = 32
