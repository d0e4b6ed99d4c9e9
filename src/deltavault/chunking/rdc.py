"""Recursive signatures in the manner of Microsoft's Remote Differential Compression.

A file's *signature* is the list of its FastCDC chunks, each entry a length and a 128-bit
BLAKE3 digest. For a big file that list is itself big (an 821 MB database has ~80k chunks:
1.6 MB), so it is treated as a byte stream and signed again, level after level, until it is
small. A receiver that holds an older version (the *seed*) fetches the top level whole, and
at each level down asks only for the chunks its own seed's stream does not have. Unchanged
regions therefore cost a few bytes of signature at every level instead of their full list.

stream 0 = the file's bytes; stream k+1 = signature(stream k).

A rebuilt stream is checked chunk by chunk: each fetched chunk against its entry, each seed
chunk by the digest it was indexed under; the fetcher then checks the whole file's BLAKE3.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import blake3

from deltavault.chunking.cdc import CdcParams, Chunker

ENTRY = struct.Struct("<I16s")  # chunk length, BLAKE3-128 of the chunk
DATA_PARAMS = CdcParams(2048, 8192, 65536)  # file bytes: small chunks, so one change costs ~10 KiB
SIG_PARAMS = CdcParams(256, 1024, 8192)  # signature streams: ~50 entries a chunk
PAGE = 4096  # level 0 in page mode: for files changed in place (databases, VM images)
TOP_MAX = 4096  # stop recursing once a signature is this small: it is sent whole
MAX_LEVELS = 8


class Chunk(NamedTuple):  # a tuple: a big file has hundreds of thousands
    offset: int
    length: int
    digest: bytes


def _cuts(stream: memoryview, level: int, pages: bool) -> list[tuple[int, int]] | range:
    if level == 0 and pages:
        return range(0, len(stream), PAGE)
    return Chunker(DATA_PARAMS if level == 0 else SIG_PARAMS).cut(stream)


def chunks(stream: bytes | memoryview, level: int, *, pages: bool = False) -> list[Chunk]:
    """A stream's chunks. Level 0 is content-defined, or whole 4 KiB pages with ``pages``
    (an in-place change then costs exactly its pages; an insertion would shift them all)."""
    mv = memoryview(stream)
    cuts = _cuts(mv, level, pages)
    if isinstance(cuts, range):
        n = len(mv)
        return [Chunk(off, min(PAGE, n - off), blake3.blake3(mv[off:off + PAGE]).digest(16)) for off in cuts]
    return [Chunk(off, ln, blake3.blake3(mv[off:off + ln]).digest(16)) for off, ln in cuts]


def signature(cs: list[Chunk]) -> bytes:
    return b"".join(ENTRY.pack(c.length, c.digest) for c in cs)


def parse(sig: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
    if len(sig) % ENTRY.size:
        raise ValueError(f"a signature is a multiple of {ENTRY.size} bytes, not {len(sig)}")
    for i in range(0, len(sig), ENTRY.size):
        yield ENTRY.unpack_from(sig, i)


@dataclass
class Ladder:
    """[data, sig(data), sig(sig(data)), ...] until a signature is at most TOP_MAX bytes,
    with the chunks each level was cut into (so a seed's index need not cut them again)."""

    streams: list[bytes | memoryview]
    chunks: list[list[Chunk]]

    @classmethod
    def build(cls, data: bytes | memoryview, *, pages: bool = False) -> Ladder:
        out: list[bytes | memoryview] = [data]
        cut: list[list[Chunk]] = []
        while len(out) <= MAX_LEVELS:
            cs = chunks(out[-1], len(out) - 1, pages=pages)
            cut.append(cs)
            sig = signature(cs)
            out.append(sig)
            if len(sig) <= TOP_MAX:
                break
        return cls(out, cut)

    def index(self, level: int) -> SeedIndex:
        if level >= len(self.chunks):
            return SeedIndex(b"", [])
        return SeedIndex(self.streams[level], self.chunks[level])


def streams(data: bytes | memoryview, *, pages: bool = False) -> list[bytes | memoryview]:
    return Ladder.build(data, pages=pages).streams


class SeedIndex:
    """Where each chunk digest of a local stream lies, to rebuild a remote stream from it."""

    def __init__(self, stream: bytes | memoryview, cs: list[Chunk]) -> None:
        self.stream = memoryview(stream)
        self.where = {c.digest: (c.offset, c.length) for c in cs}

    @classmethod
    def of(cls, stream: bytes | memoryview, level: int, *, pages: bool = False) -> SeedIndex:
        return cls(stream, chunks(stream, level, pages=pages))

    def find(self, digest: bytes, length: int) -> int | None:
        """The offset in the stream of a chunk with this digest and length."""
        hit = self.where.get(digest)
        return hit[0] if hit is not None and hit[1] == length else None


@dataclass
class Plan:
    """A remote stream, piece by piece: (offset in it, length, digest, offset in the seed
    or None when the piece must be fetched)."""

    pieces: list[tuple[int, int, bytes, int | None]]

    @property
    def missing(self) -> list[tuple[int, int]]:
        return [(o, n) for o, n, _d, s in self.pieces if s is None]

    @property
    def size(self) -> int:
        return sum(n for _o, n, _d, _s in self.pieces)


def plan(sig: bytes | memoryview, seed: SeedIndex) -> Plan:
    pieces = []
    off = 0
    for length, digest in parse(sig):
        pieces.append((off, length, digest, seed.find(digest, length)))
        off += length
    return Plan(pieces)


def verify_fetched(p: Plan, fetched: list[bytes]) -> bool:
    """Does each fetched chunk have the length and digest its signature entry lists? (Seed
    chunks were hashed when the seed was indexed.)"""
    want = [(n, d) for _o, n, d, s in p.pieces if s is None]
    return len(want) == len(fetched) and all(
        len(b) == n and blake3.blake3(b).digest(16) == d for (n, d), b in zip(want, fetched))


def assemble(p: Plan, seed: SeedIndex, fetched: list[bytes]) -> list[bytes | memoryview]:
    """The remote stream as a list of buffers, in order: the fetched chunks (bytes), and
    views of the seed, one per run of chunks that lie one after another in it."""
    it = iter(fetched)
    mv = seed.stream
    out: list[bytes | memoryview] = []
    run_start = run_end = -1
    for _o, n, _d, s in p.pieces:
        if s is not None and s == run_end:
            run_end += n
            continue
        if run_start >= 0:
            out.append(mv[run_start:run_end])
            run_start = -1
        if s is None:
            out.append(next(it))
        else:
            run_start, run_end = s, s + n
    if run_start >= 0:
        out.append(mv[run_start:run_end])
    return out


@lru_cache(maxsize=64)
def zero_digest(n: int) -> bytes:
    return blake3.blake3(bytes(n)).digest(16)


def regions(p: Plan, seed: SeedIndex,
            fetched: list[bytes]) -> Iterator[tuple[int, int, memoryview | bytes | None, bool]]:
    """(offset, length, buffer, from the seed) for each piece in order; the buffer is None
    for a piece of zeros, which a writer may leave as a hole."""
    it = iter(fetched)
    mv = seed.stream
    for o, n, d, s in p.pieces:
        buf = mv[s:s + n] if s is not None else next(it)
        yield o, n, (None if d == zero_digest(n) else buf), s is not None
