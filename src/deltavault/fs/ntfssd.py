"""Windows security descriptors (self-relative, as ntfs-3g's ``system.ntfs_acl`` gives them):
just enough parsing to show the owner and group SIDs. The bytes themselves are what is kept."""

from __future__ import annotations

import struct

_HEADER = struct.Struct("<BBHIIII")  # revision, sbz1, control, owner, group, sacl, dacl offsets
SE_SELF_RELATIVE = 0x8000


class BadDescriptor(ValueError):
    """The bytes are not a self-relative security descriptor this parser understands."""


def sid_text(data: bytes, offset: int) -> str:
    """The SID at ``offset`` as text: S-1-5-21-...."""
    if offset + 8 > len(data):
        raise BadDescriptor(f"SID at {offset} beyond the descriptor's {len(data)} bytes")
    rev, count = data[offset], data[offset + 1]
    if rev != 1 or count > 15 or offset + 8 + 4 * count > len(data):
        raise BadDescriptor(f"not a SID at {offset}")
    auth = int.from_bytes(data[offset + 2:offset + 8], "big")
    subs = struct.unpack_from(f"<{count}I", data, offset + 8)
    return "S-1-" + "-".join([str(auth), *map(str, subs)])


def owner_group(sd: bytes) -> tuple[str, str]:
    """Owner and group SIDs of a self-relative descriptor ("" where it has none)."""
    if len(sd) < _HEADER.size:
        raise BadDescriptor(f"{len(sd)} bytes: shorter than a descriptor's header")
    rev, _sbz, control, owner, group, _sacl, _dacl = _HEADER.unpack_from(sd)
    if rev != 1 or not control & SE_SELF_RELATIVE:
        raise BadDescriptor(f"revision {rev}, control {control:#06x}: not a self-relative descriptor")
    return (sid_text(sd, owner) if owner else "", sid_text(sd, group) if group else "")
