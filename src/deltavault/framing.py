"""Decoding bytes nobody vouches for (``decode_msgpack``, ``decode_json``: every stored
object, key file, config and peer message goes through them), and length-prefixed msgpack
frames (u32 little-endian length, then the body) over a byte stream: the page-digest
helper's pipe and the remote delta protocol."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
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


# msgspec works out a Struct type's field layout on the type's first decode, and that step is
# not thread-safe: two threads decoding a type for the first time at once crashed the process
# (SIGSEGV in msgspec 0.22, tests/unit/test_framing_threads.py). So each type gets one decoder,
# made under a lock; a made decoder is thread-safe, and later decodes skip the type lookup.
_MAKING = threading.Lock()
_MSGPACK: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
_JSON: dict[Any, msgspec.json.Decoder[Any]] = {}
D = TypeVar("D")


def _decoder(made: dict[Any, D], make: Callable[[Any], D], kind: Any) -> D:
    """``kind``'s decoder from ``made``, made by ``make`` under the lock the first time."""
    d = made.get(kind)
    if d is None:
        with _MAKING:
            d = made.get(kind)
            if d is None:
                d = made[kind] = make(kind)
    return d


def decode_msgpack(raw: bytes | msgspec.Raw, kind: type[T]) -> T:
    """``raw`` as msgpack of ``kind``; whatever the bytes, that or ``Undecodable``."""
    decoder: msgspec.msgpack.Decoder[T] = _decoder(_MSGPACK, msgspec.msgpack.Decoder, kind)
    try:
        return decoder.decode(raw)
    except _UNDECODABLE as exc:
        raise Undecodable(_why(exc)) from exc


def decode_json(raw: bytes, kind: type[T]) -> T:
    """``raw`` as JSON of ``kind``; whatever the bytes, that or ``Undecodable``."""
    decoder: msgspec.json.Decoder[T] = _decoder(_JSON, msgspec.json.Decoder, kind)
    try:
        return decoder.decode(raw)
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
