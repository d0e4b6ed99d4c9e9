"""Removing an entry of a tree others may write in (sync's DST and restore's target, for
--delete and a directory in the way of a file): a file, or a whole tree, iteratively,
through directory fds only, so a symlink swapped in during the run cannot redirect a
delete, a FIFO swapped in for a directory is never opened for reading (``O_DIRECTORY``),
and no depth or path length limit applies. Removal never crosses into another mount (it
may show sync's SRC, or anything else)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from deltavault.fs.dirfd import Replaced, identity, mount_id, open_dir_checked, open_parent_checked


class MountPoint(OSError):
    """A directory --delete would empty is the root of another mount: never crossed (it may
    show sync's SRC, or anything else that is not the tree's own)."""

    def __init__(self) -> None:
        super().__init__(errno.EBUSY, "a mount point: --delete does not reach into other mounts; left alone")


@dataclass(eq=False)
class _Doomed:
    """A directory being emptied, then removed."""

    fd: int
    name: bytes
    rel: bytes
    st: os.stat_result
    mnt: int
    names: list[bytes]  # entries left, in reverse order (popped from the end)


def _open_doomed(dir_fd: int, name: bytes, rel: bytes, st: os.stat_result, parent_mnt: int) -> _Doomed:
    fd = open_dir_checked(dir_fd, name, identity(st))
    try:
        mnt = mount_id(fd)
        if mnt != parent_mnt:
            raise MountPoint
        names = sorted((os.fsencode(n) for n in os.listdir(fd)), reverse=True)
    except BaseException:
        os.close(fd)
        raise
    return _Doomed(fd, name, rel, st, mnt, names)


def remove_entry(dir_fd: int, name: bytes, relpath: bytes,
                 removed: Callable[[bytes, os.stat_result], None], max_open: int = 64) -> None:
    """Remove a file or a whole directory tree; ``removed`` is told of each entry, children
    first. Iterative, at any depth, holding at most ``max_open`` directories open (deeper,
    the shallowest are closed and opened again through ".." of their child, checked to be
    the same directory). A directory that is replaced during the removal, or is a mount
    point, stops it with an error."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        removed(relpath, st)
        return
    stack = [_open_doomed(dir_fd, name, relpath, st, mount_id(dir_fd))]
    closed_below = 0  # stack[:closed_below] have their fd closed
    try:
        while stack:
            f = stack[-1]
            if f.names:
                n = f.names.pop()
                crel = f.rel + b"/" + n
                cst = os.stat(n, dir_fd=f.fd, follow_symlinks=False)
                if stat.S_ISDIR(cst.st_mode):
                    stack.append(_open_doomed(f.fd, n, crel, cst, f.mnt))
                    if len(stack) - closed_below > max_open:
                        os.close(stack[closed_below].fd)
                        stack[closed_below].fd = -1
                        closed_below += 1
                else:
                    os.unlink(n, dir_fd=f.fd)
                    removed(crel, cst)
                continue
            stack.pop()
            if stack and stack[-1].fd < 0:
                fd = open_parent_checked(f.fd, identity(stack[-1].st))
                if fd is None:
                    raise Replaced("a directory was moved while it was being removed")
                stack[-1].fd = fd
                closed_below = len(stack) - 1
            os.close(f.fd)
            f.fd = -1
            os.rmdir(f.name, dir_fd=stack[-1].fd if stack else dir_fd)
            removed(f.rel, f.st)
    finally:
        for f in stack:
            if f.fd >= 0:
                os.close(f.fd)
