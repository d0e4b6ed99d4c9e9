"""Length-prefixed msgpack frames (u32 little-endian length, then the body) over a byte
stream: the page-digest helper's pipe and the remote delta protocol."""

from __future__ import annotations

import struct
from typing import IO, Any

import msgspec

from deltavault.errors import CorruptionError

LEN = struct.Struct("<I")
MAX_FRAME = 1 << 30


def write_frame(stream: IO[bytes], obj: object) -> int:
    """Send one frame; returns the bytes written."""
    body = msgspec.msgpack.encode(obj)
    stream.write(LEN.pack(len(body)) + body)
    stream.flush()
    return LEN.size + len(body)


def read_frame(stream: IO[bytes]) -> tuple[Any, int] | None:
    """(the object, bytes read), or None when the stream ends, also in the middle of a frame."""
    head = stream.read(LEN.size)
    if len(head) < LEN.size:
        return None
    (n,) = LEN.unpack(head)
    if n > MAX_FRAME:
        raise CorruptionError(f"a frame of {n} bytes is larger than allowed")
    body = stream.read(n)
    if len(body) < n:
        return None
    return msgspec.msgpack.decode(body), LEN.size + n
