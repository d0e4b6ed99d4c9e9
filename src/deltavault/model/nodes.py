"""Tree nodes: one per directory entry, with the metadata needed to restore it exactly."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from deltavault.model.content import ContentRef
from deltavault.model.windows import WinMeta

TREE_VERSION = 1


class NodeType(StrEnum):
    FILE = "f"
    DIR = "d"
    SYMLINK = "l"
    FIFO = "p"
    CHARDEV = "c"
    BLOCKDEV = "b"


class Node(msgspec.Struct, omit_defaults=True, kw_only=True):
    name: bytes  # raw file-system bytes: any name that is not UTF-8 survives
    type: NodeType
    mode: int = 0  # permission bits incl. setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    user: str = ""
    group: str = ""
    mtime: int = 0  # ns
    atime: int = 0  # ns
    ctime: int = 0  # ns, for change detection only; cannot be restored
    size: int = 0
    inode: int = 0
    links: int = 1
    dev: int = 0  # set only when links > 1, to group hard links within one snapshot
    rdev: int = 0
    target: bytes = b""  # symlink target
    xattrs: list[tuple[bytes, bytes]] = []  # incl. system.posix_acl_*; sorted by name
    content: list[ContentRef] = []
    subtree: bytes | None = None  # tree blob id of a directory
    pages: list[bytes] | None = None  # META blobs: per-page digests of a large file (64 MiB each)
    win: WinMeta | None = None  # NTFS metadata and named streams (from an ntfs-3g mount)


class Tree(msgspec.Struct, omit_defaults=True):
    nodes: list[Node]
    v: int = TREE_VERSION
