"""How a file's (or a volume's) bytes are described: a list of content references.

``Full``  a blob holding the bytes.
``Hole``  a run of zeros that was a hole in the source (restored as a hole).
``Patch`` a base blob with page patches applied in order. Large files changed in place and
          volumes store only the changed 4 KiB pages this way; see docs/design.md.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

PAGE_SIZE = 4096
# A size or count, checked on decode (msgspec checks ``Meta`` only when decoding): a negative
# one in a stored tree is damage, not a hole that moves a restore's offset backwards.
Count = Annotated[int, msgspec.Meta(ge=0)]


class Full(msgspec.Struct, array_like=True, frozen=True, tag=0):
    id: bytes
    size: Count


class Hole(msgspec.Struct, array_like=True, frozen=True, tag=1):
    size: Count


class Patch(msgspec.Struct, array_like=True, frozen=True, tag=2):
    base: bytes
    patches: list[bytes]
    size: Count
    # Bitmap (little-endian bit order) of the pages any patch in the chain covers.
    pages: bytes


ContentRef = Full | Hole | Patch


def content_size(refs: list[ContentRef]) -> int:
    return sum(r.size for r in refs)


def ref_blob_ids(ref: ContentRef) -> list[bytes]:
    if isinstance(ref, Full):
        return [ref.id]
    if isinstance(ref, Patch):
        return [ref.base, *ref.patches]
    return []
