"""The most bytes an object read whole may have, by its kind (docs/design.md, "A store that
lies"). Every whole read of every backend (``get`` without a length) is bounded here, so no
caller can forget: the store's answer is refused unread when it says it is larger (S3's
Content-Length, SFTP's and a local file's size), and reading stops one byte past the
limit when it does not say, or says less than it sends (a chunked body, a local symlink
to /dev/zero, a file that grows). Ranged reads are bounded by the length asked."""

from __future__ import annotations

from collections.abc import Callable

from deltavault.errors import ObjectTooLarge

MiB = 1024 * 1024

# A kind is the object name's first component. The writers stay far below these: a key
# file and a lock record are a few hundred bytes, the config about one KiB; a snapshot holds
# its summary (lists of at most 100 entries, bitmaps under 8 KiB); the index writer splits a
# file that would be larger than INDEX_MAX (repository/indexstore.py); a pack is at most the
# largest pack size (128 MiB) plus one blob (256 MiB) and its header (64 MiB).
INDEX_MAX = 256 * MiB
PACK_MAX = 512 * MiB
LIMITS = {
    "config": 1 * MiB,
    "keys": 1 * MiB,
    "locks": 1 * MiB,
    "snapshots": 64 * MiB,
    "status": 64 * MiB,
    "index": INDEX_MAX,
    "data": PACK_MAX,
}
_KINDS = {"config": "config", "keys": "key file", "locks": "lock record", "snapshots": "snapshot",
          "status": "status record", "index": "index file", "data": "pack"}
_PIECE = 1024 * 1024


def whole_limit(name: str) -> int:
    """The most bytes the object ``name`` may have (any other name: a pack's limit)."""
    return LIMITS.get(name.partition("/")[0], PACK_MAX)


def too_large(name: str, size: int | None, most: int) -> ObjectTooLarge:
    kind = _KINDS.get(name.partition("/")[0], "object")
    said = f"{size} bytes" if size is not None else f"more than {most} bytes"
    return ObjectTooLarge(f"{name}: the store answered {said} for a {kind}, which is at most {most} bytes: "
                          "refused unread (a hostile or broken store)")


def check_size(name: str, size: int, most: int) -> None:
    """Refuse, before reading it, an object the store says is larger than ``most``."""
    if size > most:
        raise too_large(name, size, most)


def read_bounded(read: Callable[[int], bytes], name: str, most: int, hint: int = 0) -> bytes:
    """Everything ``read(n)`` gives until it gives b"", at most ``most`` bytes: reading
    stops one byte past, and that is an error. ``hint``: the size the store said (one read
    of it and one more to see the end, with no copy)."""
    first = read(min(max(hint, 0), most) + 1)
    if len(first) > most:
        raise too_large(name, None, most)
    if not first:
        return b""
    pieces, have = [first], len(first)
    while piece := read(min(_PIECE, most + 1 - have)):
        pieces.append(piece)
        have += len(piece)
        if have > most:
            raise too_large(name, None, most)
    return first if len(pieces) == 1 else b"".join(pieces)
