"""Per-page digests (4 KiB) that find which pages of a region changed.

Keyed BLAKE3 truncated to 128 bits: a crafted collision would hide a change, so the
digest must be cryptographic, and keyed so nobody can target it.
"""

from __future__ import annotations

import blake3

from deltavault.model.content import PAGE_SIZE

DIGEST = 16


def page_digests(buf: bytes | memoryview, key: bytes | None) -> bytes:
    mv = memoryview(buf)
    b3 = blake3.blake3
    if key is None:
        return b"".join([b3(mv[i:i + PAGE_SIZE]).digest(DIGEST) for i in range(0, len(mv), PAGE_SIZE)])
    return b"".join([b3(mv[i:i + PAGE_SIZE], key=key).digest(DIGEST)
                     for i in range(0, len(mv), PAGE_SIZE)])


def changed_pages(old: bytes, new: bytes) -> list[int]:
    """Indexes of pages whose digests differ (new pages beyond old count as changed)."""
    n_new = len(new) // DIGEST
    n_old = len(old) // DIGEST
    if old == new:
        return []
    out = []
    for i in range(n_new):
        if i >= n_old or old[i * DIGEST:(i + 1) * DIGEST] != new[i * DIGEST:(i + 1) * DIGEST]:
            out.append(i)
    return out


def pages_in(size: int) -> int:
    return (size + PAGE_SIZE - 1) // PAGE_SIZE
