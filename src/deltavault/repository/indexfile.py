"""Index files: sealed msgpack documents under ``index/`` naming, for each pack, the blobs in
it. A file may supersede others (compaction by prune or repair), and may name packs a
backup found gone from the repository (``gone``): copies of their blobs in other packs are
preferred when the index is built (indexstore.py).
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec

from deltavault.errors import FormatError, Undecodable, UnsupportedVersion
from deltavault.framing import decode_msgpack
from deltavault.model.types import ID_LEN, BlobType
from deltavault.repository.pack import PackEntry

INDEX_VERSION = 1
INDEX_AAD = b"index"


class IndexPack(msgspec.Struct, array_like=True):
    id: bytes
    blobs: list[PackEntry]


class IndexFile(msgspec.Struct, omit_defaults=True):
    packs: list[IndexPack]
    supersedes: list[bytes] = []
    v: int = INDEX_VERSION
    # Packs the writer found missing (a backup's LIST): their blobs' copies elsewhere win.
    # Left out when empty, so other files are as before; older readers ignore the field.
    gone: list[bytes] = []


def encode_index(f: IndexFile) -> bytes:
    return msgspec.msgpack.encode(f)


class _PackSize(msgspec.Struct, array_like=True):
    id: msgspec.Raw
    blobs: msgspec.Raw  # left encoded: only its array header is read (_array_length)


class _IndexHead(msgspec.Struct):
    packs: list[_PackSize] = []
    supersedes: list[bytes] = []
    v: int = INDEX_VERSION
    gone: list[bytes] = []


def _array_length(raw: msgspec.Raw) -> int:
    """The element count in a msgpack array's header (0 for anything else)."""
    with memoryview(raw) as m:
        if len(m) >= 1 and 0x90 <= m[0] <= 0x9F:
            return m[0] & 0x0F
        if len(m) >= 3 and m[0] == 0xDC:
            return int.from_bytes(m[1:3], "big")
        if len(m) >= 5 and m[0] == 0xDD:
            return int.from_bytes(m[1:5], "big")
    return 0


class _LazyIndexFile(msgspec.Struct):
    packs: list[msgspec.Raw]
    supersedes: list[bytes] = []
    v: int = INDEX_VERSION


_Doc = TypeVar("_Doc", IndexFile, _IndexHead, _LazyIndexFile)


def _decode(raw: bytes, kind: type[_Doc], name: str) -> _Doc:
    """An index file as ``kind`` (the whole file or only its head), of this build's version."""
    try:
        doc = decode_msgpack(raw, kind)
    except Undecodable as exc:
        raise FormatError(f"index {name} does not parse: {exc}") from exc
    if doc.v != INDEX_VERSION:
        raise UnsupportedVersion(f"index {name} has version {doc.v}; this build reads {INDEX_VERSION}")
    return doc


def _checked(p: IndexPack, name: str) -> IndexPack:
    if len(p.id) != ID_LEN:
        raise FormatError(f"index {name}: bad pack id")
    for b in p.blobs:
        if (len(b.id) != ID_LEN or not 0 <= b.offset < 1 << 40 or not 0 < b.length < 1 << 32
                or not 0 <= b.raw_length < 1 << 32 or b.type not in BlobType._value2member_map_):
            raise FormatError(f"index {name}: bad blob entry")
    return p


def decode_index(raw: bytes, name: str) -> IndexFile:
    f = _decode(raw, IndexFile, name)
    for p in f.packs:
        _checked(p, name)
    return f


# The checks of _checked, as constraints msgspec applies while it decodes (in C: the
# Python loop took a quarter of loading a 1M-blob index).
_Id = Annotated[bytes, msgspec.Meta(min_length=ID_LEN, max_length=ID_LEN)]


class _CheckedEntry(msgspec.Struct, array_like=True):
    type: BlobType
    id: _Id
    offset: Annotated[int, msgspec.Meta(ge=0, lt=1 << 40)]
    length: Annotated[int, msgspec.Meta(gt=0, lt=1 << 32)]
    raw_length: Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]


class _CheckedPack(msgspec.Struct, array_like=True):
    id: _Id
    blobs: list[_CheckedEntry]


def check_index(raw: bytes, name: str) -> list[msgspec.Raw]:
    """An index file's packs, each still encoded: the whole file is parsed and every entry
    checked, as ``decode_index`` does, but only one pack's entries exist as objects at a
    time (``decode_index_pack``). A 1M-blob index decoded whole took 230 bytes a blob for
    the moment it was added (the index itself keeps 61)."""
    packs = _decode(raw, _LazyIndexFile, name).packs
    for p in packs:  # all or nothing: nothing is added from a bad file
        try:
            decode_msgpack(p, _CheckedPack)
        except Undecodable as exc:
            raise FormatError(f"index {name}: bad pack or blob entry ({exc})") from exc
    return packs


def decode_index_pack(raw: msgspec.Raw, name: str, *, checked: bool = False) -> IndexPack:
    """One pack of an index file; ``checked``: ``check_index`` has checked it already."""
    try:
        p = decode_msgpack(raw, IndexPack)
    except Undecodable as exc:
        raise FormatError(f"index {name} does not parse: {exc}") from exc
    return p if checked else _checked(p, name)


def decode_index_head(raw: bytes, name: str) -> tuple[list[bytes], int, list[bytes]]:
    """The ids an index file supersedes, how many blob entries it holds (read from each
    pack's array header: its entries are skipped without being built; the count sizes the
    in-memory index before they are added; ``check_index`` checks them), and the packs it
    names as gone."""
    head = _decode(raw, _IndexHead, name)
    # Each count is of an array msgspec has just walked whole, so it is at most its bytes:
    # a file cannot make the table sized for more blobs than it has bytes.
    return head.supersedes, sum(_array_length(p.blobs) for p in head.packs), head.gone
