"""Per-page digests (4 KiB) that find which pages of a region changed.

Keyed BLAKE3 truncated to 128 bits: a crafted collision would hide a change, so the
digest must be cryptographic, and keyed so nobody can target it.
"""

from __future__ import annotations

from collections.abc import Callable

import blake3

from deltavault.model.content import PAGE_SIZE

DIGEST = 16


class PageHasher:
    """Digests of pages under one key. Copying a keyed hasher skips the key setup, which is
    about a fifth of the cost of hashing one 4 KiB page."""

    def __init__(self, key: bytes | None) -> None:
        self._base = blake3.blake3(key=key) if key is not None else blake3.blake3()
        self.zero = self.digest(bytes(PAGE_SIZE))

    def digest(self, page: bytes | memoryview) -> bytes:
        h = self._base.copy()
        h.update(page)
        return h.digest(DIGEST)

    def digests(self, buf: bytes | bytearray | memoryview) -> bytes:
        """Digests of consecutive pages of ``buf`` (the last may be short)."""
        mv = memoryview(buf)
        base = self._base
        out = []
        for i in range(0, len(mv), PAGE_SIZE):
            h = base.copy()
            h.update(mv[i:i + PAGE_SIZE])
            out.append(h.digest(DIGEST))
        return b"".join(out)


PAGES_PER_DIGEST_BLOB = 16384  # 64 MiB of file per META blob (docs/design.md)
SEGMENT_BYTES = PAGES_PER_DIGEST_BLOB * DIGEST


class DigestSegments:
    """A file's page digests, taken in order and handed on one META segment
    (``PAGES_PER_DIGEST_BLOB`` pages) at a time, so that no more than one segment is ever
    held, whatever the file's size. ``emit(data)`` gets each complete segment's bytes, or
    None for a whole segment of hole pages (the caller stores that one blob once); the
    last, shorter segment comes from ``finish``."""

    def __init__(self, hasher: PageHasher, emit: Callable[[bytes | None], None]) -> None:
        self.hasher = hasher
        self.emit = emit
        self.pages = 0  # pages taken so far
        self._buf = bytearray()

    def add(self, digests: bytes | bytearray | memoryview) -> None:
        """Digests of the next pages (16 bytes each)."""
        self._buf += digests
        self.pages += len(digests) // DIGEST
        while len(self._buf) >= SEGMENT_BYTES:
            self.emit(bytes(self._buf[:SEGMENT_BYTES]))
            del self._buf[:SEGMENT_BYTES]

    def add_zeros(self, length: int) -> None:
        """``length`` bytes of zeros (a hole) starting on a page boundary; only the file's
        last page may be short. Whole segments of them cost no per-page work."""
        full, rest = divmod(length, PAGE_SIZE)
        room = (SEGMENT_BYTES - len(self._buf)) // DIGEST
        if self._buf or full < PAGES_PER_DIGEST_BLOB:
            take = min(full, room)
            self.add(self.hasher.zero * take)
            full -= take
        while full >= PAGES_PER_DIGEST_BLOB:
            self.emit(None)
            self.pages += PAGES_PER_DIGEST_BLOB
            full -= PAGES_PER_DIGEST_BLOB
        if full:
            self.add(self.hasher.zero * full)
        if rest:
            self.add(self.hasher.digest(bytes(rest)))

    def finish(self) -> None:
        if self._buf:
            self.emit(bytes(self._buf))
            self._buf.clear()

    def zero_segment(self) -> bytes:
        """The bytes ``emit(None)`` stands for."""
        return self.hasher.zero * PAGES_PER_DIGEST_BLOB


def segment_count(size: int) -> int:
    """META segments of page digests for a file of ``size`` bytes."""
    pages = -(-size // PAGE_SIZE)
    return -(-pages // PAGES_PER_DIGEST_BLOB)
