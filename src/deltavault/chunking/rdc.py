"""Recursive signatures in the manner of Microsoft's Remote Differential Compression.

A file's *signature* is the list of its FastCDC chunks, each entry a length and a 128-bit
BLAKE3 digest. For a big file that list is itself big (an 821 MB database has ~80k chunks:
1.6 MB), so it is treated as a byte stream and signed again, level after level, until it is
small. A receiver that holds an older version (the *seed*) fetches the top level whole, and
at each level down asks only for the chunks its own seed's stream does not have. Unchanged
regions therefore cost a few bytes of signature at every level instead of their full list.

stream 0 = the file's bytes; stream k+1 = signature(stream k).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import blake3

from deltavault.chunking.cdc import CdcParams, Chunker

ENTRY = struct.Struct("<I16s")  # chunk length, BLAKE3-128 of the chunk
DATA_PARAMS = CdcParams(2048, 8192, 65536)  # file bytes: small chunks, so one change costs ~10 KiB
SIG_PARAMS = CdcParams(256, 1024, 8192)  # signature streams: ~50 entries a chunk
TOP_MAX = 4096  # stop recursing once a signature is this small: it is sent whole
MAX_LEVELS = 8


@dataclass(frozen=True)
class Chunk:
    offset: int
    length: int
    digest: bytes


def _chunker(level: int) -> Chunker:
    return Chunker(DATA_PARAMS if level == 0 else SIG_PARAMS)


def chunks(stream: bytes | memoryview, level: int) -> list[Chunk]:
    mv = memoryview(stream)
    return [Chunk(off, ln, blake3.blake3(mv[off:off + ln]).digest(16))
            for off, ln in _chunker(level).cut(mv)]


def signature(cs: list[Chunk]) -> bytes:
    return b"".join(ENTRY.pack(c.length, c.digest) for c in cs)


def parse(sig: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
    if len(sig) % ENTRY.size:
        raise ValueError(f"a signature is a multiple of {ENTRY.size} bytes, not {len(sig)}")
    for i in range(0, len(sig), ENTRY.size):
        yield ENTRY.unpack_from(sig, i)


def streams(data: bytes | memoryview) -> list[bytes | memoryview]:
    """[data, sig(data), sig(sig(data)), ...] until a signature is at most TOP_MAX bytes."""
    out: list[bytes | memoryview] = [data]
    while len(out) <= MAX_LEVELS:
        sig = signature(chunks(out[-1], len(out) - 1))
        out.append(sig)
        if len(sig) <= TOP_MAX:
            break
    return out


class SeedIndex:
    """Where each chunk digest of a local stream lies, to rebuild a remote stream from it."""

    def __init__(self, stream: bytes | memoryview, level: int) -> None:
        self.stream = memoryview(stream)
        self.where = {c.digest: (c.offset, c.length) for c in chunks(stream, level)}

    def get(self, digest: bytes, length: int) -> memoryview | None:
        hit = self.where.get(digest)
        if hit is None or hit[1] != length:
            return None
        return self.stream[hit[0]:hit[0] + length]


def plan(sig: bytes | memoryview, seed: SeedIndex) -> tuple[list[memoryview | None], list[tuple[int, int]]]:
    """For each chunk the remote signature lists: the seed's bytes, or None and its
    (offset, length) in the remote stream, to be fetched."""
    parts: list[memoryview | None] = []
    missing: list[tuple[int, int]] = []
    off = 0
    for length, digest in parse(sig):
        local = seed.get(digest, length)
        parts.append(local)
        if local is None:
            missing.append((off, length))
        off += length
    return parts, missing


def assemble(parts: list[memoryview | None], fetched: list[bytes]) -> bytes:
    it = iter(fetched)
    return b"".join(p if p is not None else next(it) for p in parts)


def check(stream: bytes, sig: bytes | memoryview, level: int) -> bool:
    """Does a rebuilt stream have exactly the chunks the signature lists?"""
    return signature(chunks(stream, level)) == bytes(sig)
