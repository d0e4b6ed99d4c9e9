"""Tree nodes: one per directory entry, with the metadata needed to restore it exactly."""

from __future__ import annotations

import os
from enum import StrEnum
from typing import Annotated

import msgspec

from deltavault.model.content import ContentRef, Count
from deltavault.model.windows import WinMeta

TREE_VERSION = 1


class NodeType(StrEnum):
    FILE = "f"
    DIR = "d"
    SYMLINK = "l"
    FIFO = "p"
    CHARDEV = "c"
    BLOCKDEV = "b"


# What a file system holds, checked on decode (msgspec checks ``Meta`` only when decoding): a
# tree that says otherwise is damage, not a value that ends a restore, dump or ls -l with an
# OverflowError deep in os.chmod or tarfile. ``unrestorable`` checks the rest.
Perm = Annotated[int, msgspec.Meta(ge=0, le=0o7777)]
Owner = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]  # uid_t, gid_t


class Node(msgspec.Struct, omit_defaults=True, kw_only=True):
    name: bytes  # raw file-system bytes: any name that is not UTF-8 survives
    type: NodeType
    mode: Perm = 0  # permission bits incl. setuid/setgid/sticky
    uid: Owner = 0
    gid: Owner = 0
    user: str = ""
    group: str = ""
    mtime: int = 0  # ns
    atime: int = 0  # ns
    ctime: int = 0  # ns, for change detection only; cannot be restored
    size: Count = 0
    inode: int = 0
    links: Count = 1
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


def unrestorable(node: Node) -> str | None:
    """Why a decoded node holds what no Linux file system can (None: nothing): a NUL in a
    symlink target or an xattr name (os.symlink and os.setxattr raise ValueError), a device
    number past the kernel's 12-bit major and 20-bit minor (tar cannot hold it). A file
    system never gives these to a backup; only a hostile writer of the repository does."""
    if b"\0" in node.target:
        return "a symlink target holding NUL"
    if any(b"\0" in name for name, _ in node.xattrs):
        return "an extended attribute name holding NUL"
    if node.rdev and (os.major(node.rdev) >= 1 << 12 or os.minor(node.rdev) >= 1 << 20):
        return "a device number no Linux device has"
    return None
