"""Decoding bytes nobody vouches for (``decode_msgpack``, ``decode_json``: every stored
object, key file, config and peer message goes through them), and length-prefixed msgpack
frames (u32 little-endian length, then the body) over a byte stream: the page-digest
helper's pipe and the remote delta protocol."""

from __future__ import annotations

import struct
from typing import IO, Any, TypeVar

import msgspec

from deltavault.errors import CorruptionError, Undecodable

T = TypeVar("T")
# Everything msgspec raises on bytes that are not a valid ``kind``: invalid UTF-8 escapes as
# UnicodeDecodeError, and arrays or maps nested deeper than the interpreter's recursion
# limit (a few bytes each, so a small file) as RecursionError.
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)


def _why(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def decode_msgpack(raw: bytes | msgspec.Raw, kind: type[T]) -> T:
    """``raw`` as msgpack of ``kind``; whatever the bytes, that or ``Undecodable``."""
    try:
        return msgspec.msgpack.decode(raw, type=kind)
    except _UNDECODABLE as exc:
        raise Undecodable(_why(exc)) from exc


def decode_json(raw: bytes, kind: type[T]) -> T:
    """``raw`` as JSON of ``kind``; whatever the bytes, that or ``Undecodable``."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except _UNDECODABLE as exc:
        raise Undecodable(_why(exc)) from exc

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
    try:
        return decode_msgpack(body, Any), LEN.size + n
    except Undecodable as exc:
        raise CorruptionError(f"a frame does not parse: {exc}") from exc
