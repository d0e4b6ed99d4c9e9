"""Reading content references back into bytes."""

from __future__ import annotations

from collections.abc import Iterator

from deltavault.errors import CorruptionError
from deltavault.model.content import ContentRef, Full, Hole, Patch
from deltavault.objects.patch import apply_patches
from deltavault.objects.store import BlobLoader, BlobSizes


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


def size_fault(src: BlobSizes, ref: ContentRef) -> str | None:
    """Whether ``ref`` names a blob (a ``Full``'s, a ``Patch``'s base) of another length than
    it says, by the length the index records (``check --read-data`` compares that with the
    blob itself): what restore and ``check`` find before reading a byte. A writer with the
    key can store a ``Full`` of 1 TiB naming a 5-byte blob. None: sound, or not indexed
    (the blob's load names it missing)."""
    bid = ref.id if isinstance(ref, Full) else ref.base if isinstance(ref, Patch) else None
    known = None if bid is None else src.blob_size(bid)
    if bid is None or known is None or known == ref.size:
        return None
    return f"blob {bid.hex()[:16]} has {known} bytes, tree says {ref.size}"


def iter_content(src: BlobLoader, refs: list[ContentRef]) -> Iterator[tuple[int, bytes | None, int]]:
    """(offset, data or None for a hole, size) for each reference in order."""
    off = 0
    for ref in refs:
        yield off, read_ref(src, ref), ref.size
        off += ref.size
