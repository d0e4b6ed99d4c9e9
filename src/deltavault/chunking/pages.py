"""Per-page digests (4 KiB) that find which pages of a region changed.

Keyed BLAKE3 truncated to 128 bits: a crafted collision would hide a change, so the
digest must be cryptographic, and keyed so nobody can target it.
"""

from __future__ import annotations

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

    def zero_run(self, length: int) -> bytes:
        """Digests of ``length`` zero bytes starting on a page boundary (a hole)."""
        full, rest = divmod(length, PAGE_SIZE)
        return self.zero * full + (self.digest(bytes(rest)) if rest else b"")

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
