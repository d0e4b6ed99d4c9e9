"""Reading content references back into bytes."""

from __future__ import annotations

from collections.abc import Iterator

from deltavault.errors import CorruptionError
from deltavault.model.content import ContentRef, Full, Hole, Patch
from deltavault.objects.patch import apply_patches
from deltavault.objects.store import BlobLoader


def read_ref(src: BlobLoader, ref: ContentRef) -> bytes | None:
    """Bytes of one reference; None for a hole."""
    if isinstance(ref, Hole):
        return None
    if isinstance(ref, Full):
        data = src.load_blob(ref.id)
        if len(data) != ref.size:
            raise CorruptionError(f"blob {ref.id.hex()[:16]} has {len(data)} bytes, tree says {ref.size}")
        return data
    if isinstance(ref, Patch):
        base = src.load_blob(ref.base)
        return apply_patches(base, [src.load_blob(p) for p in ref.patches], ref.size)
    raise CorruptionError(f"unknown content reference {ref!r}")


def iter_content(src: BlobLoader, refs: list[ContentRef]) -> Iterator[tuple[int, bytes | None, int]]:
    """(offset, data or None for a hole, size) for each reference in order."""
    off = 0
    for ref in refs:
        yield off, read_ref(src, ref), ref.size
        off += ref.size
