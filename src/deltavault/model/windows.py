"""Windows (NTFS) metadata of a tree node, as ntfs-3g shows it on Linux.

Every field is kept as the bytes or number the file system gave, so a restore onto NTFS
sets it back byte for byte; ``owner`` is a parsed view for listings only. Named data
streams are content: chunked and deduplicated like a file's data.
"""

from __future__ import annotations

import msgspec

from deltavault.model.content import ContentRef, Count


class Stream(msgspec.Struct, omit_defaults=True, kw_only=True):
    name: bytes  # the stream's name, without the file's name or the ':'
    size: Count = 0
    content: list[ContentRef] = []


class WinMeta(msgspec.Struct, omit_defaults=True, kw_only=True):
    sd: bytes = b""  # security descriptor, self-relative (system.ntfs_acl): owner, group, DACL, SACL
    owner: str = ""  # owner SID as text (S-1-5-32-544), parsed from sd; "" if it did not parse
    attrib: int | None = None  # DOS attributes (FILE_ATTRIBUTE_*), system.ntfs_attrib
    times: bytes = b""  # system.ntfs_times: creation, last write, last access, change (4 x u64 LE, 100 ns)
    reparse: bytes = b""  # reparse point data (junctions, Windows symlinks), system.ntfs_reparse_data
    streams: list[Stream] = []  # named data streams, sorted by name


def creation_time_ns(win: WinMeta) -> int | None:
    """The creation time as ns since the Unix epoch, from ``times`` (None if not recorded)."""
    if len(win.times) < 8:
        return None
    ticks = int.from_bytes(win.times[:8], "little")
    return (ticks - 116_444_736_000_000_000) * 100
