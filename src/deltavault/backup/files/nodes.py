"""Tree nodes from what the walk sees: stat data and extended attributes, and whether an
entry's metadata is what the previous run recorded."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import msgspec

from deltavault.backup.files.options import RunLog
from deltavault.fs.dirfd import fd_path, handle_at, identity
from deltavault.fs.meta import group_name, read_bounded, user_name
from deltavault.model.nodes import Node, NodeType

Xattrs = list[tuple[bytes, bytes]]


def make_node(name: bytes, ntype: NodeType, st: os.stat_result, xattrs: Xattrs, **kw: object) -> Node:
    links = st.st_nlink if ntype != NodeType.DIR else 1
    return Node(name=name, type=ntype, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                user=user_name(st.st_uid), group=group_name(st.st_gid), mtime=st.st_mtime_ns,
                atime=st.st_atime_ns, ctime=st.st_ctime_ns,
                size=st.st_size if ntype == NodeType.FILE else 0,
                inode=st.st_ino, links=links, dev=st.st_dev if links > 1 else 0,
                xattrs=xattrs, **kw)  # type: ignore[arg-type]


def same_meta(node: Node, prev: Node | None) -> bool:
    """Unchanged but for the access time (reading a file changes that; listing a directory
    changes NTFS's too)."""
    if prev is None:
        return False
    win = node.win
    if win is not None and prev.win is not None and len(win.times) == len(prev.win.times) == 32:
        win = msgspec.structs.replace(win, times=win.times[:16] + prev.win.times[16:24] + win.times[24:])
    return msgspec.structs.replace(node, atime=prev.atime, win=win) == prev


def dir_clean(node: Node, prev: Node | None) -> bool:
    """A directory's own metadata is unchanged (its entries are judged separately)."""
    return prev is not None and same_meta(msgspec.structs.replace(node, subtree=prev.subtree), prev)


def bounded_xattrs(log: RunLog, target: int | bytes, path: bytes, *, follow: bool = False,
                   want: Callable[[bytes], bool] | None = None, quiet: tuple[int, ...] = ()) -> Xattrs:
    """The xattrs of ``target`` (an fd, or a /proc path of a handle) that ``want`` takes, up
    to INLINE_MAX together; what is not read is a problem of ``path`` (the run partial).
    [] if they cannot be read: reported, unless the error is one of ``quiet``."""
    try:
        got = read_bounded(target, follow=follow, want=want)
    except OSError as exc:
        if exc.errno in quiet:
            return []
        log.problem(path, "metadata", f"extended attributes unreadable: {exc.strerror}")
        return []
    left = got.left()
    if left is not None:
        log.problem(path, "metadata", left)
    return got.values


def open_handle(log: RunLog, dir_fd: int, fsname: bytes, path: bytes) -> tuple[int, os.stat_result] | None:
    """An O_PATH handle to the entry ``fsname`` of ``dir_fd`` and its stat, or None (reported)."""
    try:
        return handle_at(dir_fd, fsname)
    except OSError as exc:
        log.os_problem(path, exc)
        return None


def handle_xattrs(log: RunLog, dir_fd: int, fsname: bytes, path: bytes, st: os.stat_result) -> Xattrs | None:
    """xattrs of an entry that is not opened (symlink, FIFO, device), through an O_PATH
    handle to it; None (reported) if it is no longer the entry that was listed."""
    got = open_handle(log, dir_fd, fsname, path)
    if got is None:
        return None
    h, hst = got
    try:
        if identity(hst) != identity(st):
            log.problem(path, "changed", "replaced while being read")
            return None
        return bounded_xattrs(log, fd_path(h), path, follow=True)
    finally:
        os.close(h)
