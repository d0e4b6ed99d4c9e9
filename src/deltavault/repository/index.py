"""Blob index: blob id -> (pack, offset, length, type).

Index files are sealed msgpack documents under ``index/``; a file may supersede others
(compaction by prune or repair). In memory, a location is packed into one int to keep
a large repository's index small.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgspec

from deltavault.errors import FormatError, UnsupportedVersion
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


def encode_index(f: IndexFile) -> bytes:
    return msgspec.msgpack.encode(f)


def decode_index(raw: bytes, name: str) -> IndexFile:
    try:
        f = msgspec.msgpack.decode(raw, type=IndexFile)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FormatError(f"index {name} does not parse: {exc}") from exc
    if f.v != INDEX_VERSION:
        raise UnsupportedVersion(f"index {name} has version {f.v}; this build reads {INDEX_VERSION}")
    for p in f.packs:
        if len(p.id) != ID_LEN:
            raise FormatError(f"index {name}: bad pack id")
        for b in p.blobs:
            if len(b.id) != ID_LEN or b.offset < 0 or b.length <= 0 or b.type not in BlobType._value2member_map_:
                raise FormatError(f"index {name}: bad blob entry")
    return f


@dataclass(frozen=True, slots=True)
class BlobLocation:
    pack_id: bytes
    offset: int
    length: int
    type: BlobType


_OFF_BITS = 40  # packs up to 1 TiB
_LEN_BITS = 32
_PACK_SHIFT = _OFF_BITS + _LEN_BITS


class Index:
    """Thread-safe for concurrent lookups and adds."""

    def __init__(self) -> None:
        self._packs: list[bytes] = []
        self._pack_no: dict[bytes, int] = {}
        # value: pack_no << 72 | offset << 32 | length; type kept apart (few bits, rarely read)
        self._loc: dict[bytes, int] = {}
        self._tree_ids: set[bytes] = set()
        self._meta_ids: set[bytes] = set()
        self._raw: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._loc)

    def __contains__(self, blob_id: object) -> bool:
        return blob_id in self._loc

    def add_pack(self, pack_id: bytes, entries: Iterable[PackEntry]) -> None:
        with self._lock:
            no = self._pack_no.get(pack_id)
            if no is None:
                no = self._pack_no[pack_id] = len(self._packs)
                self._packs.append(pack_id)
            for e in entries:
                if e.id in self._loc:
                    continue  # a duplicate copy in another pack: keep the first
                self._loc[e.id] = no << _PACK_SHIFT | e.offset << _LEN_BITS | e.length
                self._raw[e.id] = e.raw_length
                if e.type == BlobType.TREE:
                    self._tree_ids.add(e.id)
                elif e.type == BlobType.META:
                    self._meta_ids.add(e.id)

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        v = self._loc.get(blob_id)
        if v is None:
            return None
        return BlobLocation(self._packs[v >> _PACK_SHIFT], (v >> _LEN_BITS) & ((1 << _OFF_BITS) - 1),
                            v & ((1 << _LEN_BITS) - 1), self.blob_type(blob_id))

    def blob_type(self, blob_id: bytes) -> BlobType:
        if blob_id in self._tree_ids:
            return BlobType.TREE
        if blob_id in self._meta_ids:
            return BlobType.META
        return BlobType.DATA

    def raw_length(self, blob_id: bytes) -> int:
        return self._raw.get(blob_id, 0)

    def packs(self) -> list[bytes]:
        return [p for p in self._packs if p is not None]

    def has_pack(self, pack_id: bytes) -> bool:
        return pack_id in self._pack_no

    def blob_ids(self) -> Iterator[bytes]:
        return iter(list(self._loc))

    def entries_by_pack(self) -> dict[bytes, list[PackEntry]]:
        out: dict[bytes, list[PackEntry]] = {}
        for bid, v in list(self._loc.items()):
            pack = self._packs[v >> _PACK_SHIFT]
            out.setdefault(pack, []).append(PackEntry(
                int(self.blob_type(bid)), bid, (v >> _LEN_BITS) & ((1 << _OFF_BITS) - 1),
                v & ((1 << _LEN_BITS) - 1), self._raw.get(bid, 0)))
        for entries in out.values():
            entries.sort(key=lambda e: e.offset)
        return out
