"""Directory-fd helpers for the destination: temp names, opening paths without following
symlinks, removing trees. Every operation is relative to an open directory, so a symlink
swapped into DST during a run cannot redirect a write or a delete."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

TEMP_PREFIX = b".dv-sync-"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def join(rel: bytes, name: bytes) -> bytes:
    """The path of ``name`` in the directory ``rel`` (b"" is the root)."""
    return rel + b"/" + name if rel else name


def temp_name(name: bytes) -> bytes:
    return TEMP_PREFIX + os.urandom(6).hex().encode() + b"." + name[:200]


def aside_name(name: bytes) -> bytes:
    """Where a file that failed --verify is kept for inspection."""
    return name[:200] + b".dv-verify-failed-" + os.urandom(3).hex().encode()


def open_dir(root_fd: int, relpath: bytes) -> int:
    """Open root/relpath one component at a time, following no symlink."""
    fd = os.dup(root_fd)
    for part in [p for p in relpath.split(b"/") if p]:
        try:
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nfd
    return fd


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_entry(dir_fd: int, name: bytes, relpath: bytes,
                 removed: Callable[[bytes, os.stat_result], None]) -> None:
    """Remove a file or a whole directory tree; ``removed`` is told of each entry, children first."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        sub = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        try:
            for child in sorted(os.listdir(sub)):
                c = os.fsencode(child)
                remove_entry(sub, c, relpath + b"/" + c, removed)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
    removed(relpath, st)

