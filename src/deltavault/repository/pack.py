"""Pack files: immutable containers of sealed blobs.

Layout: MAGIC(8) | sealed blob ... | sealed header | header_len(u32 LE) | TRAILER(4)
The header is a sealed msgpack list of [type, id, offset, length, raw_length]. A pack's
name is the BLAKE3 of all its bytes, so `check` verifies a pack without the key.
"""

from __future__ import annotations

import struct

import blake3
import msgspec

from deltavault.errors import FormatError
from deltavault.model.types import ID_LEN, BlobType
from deltavault.repository.envelope import Envelope

MAGIC = b"DVPACK\x01\x00"
TRAILER = b"DVP1"
_TAIL = struct.Struct("<I4s")
HEADER_AAD = b"pack-header"
BLOB_AAD = b"blob"
MAX_HEADER = 64 * 1024 * 1024


class PackEntry(msgspec.Struct, array_like=True, frozen=True):
    type: int
    id: bytes
    offset: int
    length: int
    raw_length: int


def pack_name(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"data/{h[:2]}/{h}"


class PackBuilder:
    """Accumulates sealed blobs as parts; ``finish`` joins them once and returns
    (pack id, bytes, entries)."""

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = [MAGIC]
        self.size = len(MAGIC)
        self.entries: list[PackEntry] = []

    def __len__(self) -> int:
        return self.size

    def add(self, btype: BlobType, blob_id: bytes, sealed: tuple[bytes, bytes | memoryview],
            raw_length: int) -> int:
        head, body = sealed
        length = len(head) + len(body)
        self.entries.append(PackEntry(int(btype), blob_id, self.size, length, raw_length))
        self.parts.append(head)
        self.parts.append(body)
        self.size += length
        return length

    def finish(self, env: Envelope) -> tuple[bytes, bytes, list[PackEntry]]:
        header = env.seal(msgspec.msgpack.encode(self.entries), aad=HEADER_AAD)
        self.parts.append(header)
        self.parts.append(_TAIL.pack(len(header), TRAILER))
        data = b"".join(self.parts)
        self.parts = []
        return blake3.blake3(data).digest(), data, self.entries


def tail_size() -> int:
    return _TAIL.size


def parse_tail(tail: bytes, pack_size: int, name: str) -> int:
    """Header length from the last bytes of a pack."""
    if len(tail) < _TAIL.size:
        raise FormatError(f"pack {name}: truncated ({pack_size} bytes)")
    hlen, trailer = _TAIL.unpack(tail[-_TAIL.size:])
    if trailer != TRAILER:
        raise FormatError(f"pack {name}: bad trailer (truncated or not a pack)")
    if hlen <= 0 or hlen > MAX_HEADER or hlen + _TAIL.size + len(MAGIC) > pack_size:
        raise FormatError(f"pack {name}: impossible header length {hlen}")
    return int(hlen)


def parse_header(env: Envelope, sealed_header: bytes, pack_size: int, name: str) -> list[PackEntry]:
    raw = env.open(sealed_header, aad=HEADER_AAD, what=f"pack {name} header")
    try:
        entries = msgspec.msgpack.decode(raw, type=list[PackEntry])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FormatError(f"pack {name}: header does not parse: {exc}") from exc
    limit = pack_size - len(sealed_header) - _TAIL.size
    for e in entries:
        if (len(e.id) != ID_LEN or e.offset < len(MAGIC) or e.length <= 0
                or e.offset + e.length > limit or e.type not in BlobType._value2member_map_
                or not 0 <= e.raw_length < 1 << 32):
            raise FormatError(f"pack {name}: header entry out of bounds or invalid")
    return entries


def read_pack_entries(env: Envelope, data: bytes, name: str) -> list[PackEntry]:
    """Parse a whole pack held in memory (used by check and repair)."""
    if not data.startswith(MAGIC):
        raise FormatError(f"pack {name}: bad magic")
    hlen = parse_tail(data[-_TAIL.size:], len(data), name)
    start = len(data) - _TAIL.size - hlen
    return parse_header(env, data[start:start + hlen], len(data), name)
