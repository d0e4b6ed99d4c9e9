"""Symlinks, FIFOs and device nodes in DST: kept when DST has the same (its metadata
corrected through a handle to it, if DST holds its one link), else made under a temp
name, checked to be the entry just made (``created_handle``: its type, the owner our new
entries get, one link), given their metadata through that handle, and renamed into place."""

from __future__ import annotations

import os
import stat

from deltavault.fs.dirfd import created_handle, handle_at, identity, rename_checked
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.receiver.entries import Xattrs, owned, single
from deltavault.sync.receiver.temps import Temps, Where


def _is_same_special(h: int, have: os.stat_result, st: os.stat_result, target: bytes) -> bool:
    if stat.S_IFMT(have.st_mode) != stat.S_IFMT(st.st_mode):
        return False
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(b"", dir_fd=h) == target  # the symlink the handle holds
    return have.st_rdev == st.st_rdev


def place_special(dfd: int, where: Where, name: bytes, st: os.stat_result, target: bytes, xattrs: Xattrs,
                  meta: MetaPolicy, temps: Temps) -> tuple[str, list[str]]:
    """A symlink (to ``target``), FIFO or device node, made under a temp name and renamed
    into place, or kept when DST has the same. Returns "same", "meta", "symlink" or "special".
    A directory in the way must have been cleared by the caller."""
    try:
        h, have = handle_at(dfd, name)
    except FileNotFoundError:
        h = -1
    if h >= 0:
        try:
            if _is_same_special(h, have, st, target) and owned(have, st, meta):
                if not meta.handle_differs(h, have, st, xattrs):
                    return "same", []
                if single(have):
                    return "meta", meta.apply_handle(h, st, xattrs)
            # another user's, or other links (maybe to an entry outside DST): made anew below
        finally:
            os.close(h)
    fmt = stat.S_IFMT(st.st_mode)
    with temps.made(where, dfd, name) as tmp:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(target, tmp, dir_fd=dfd)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(tmp, 0o600, dir_fd=dfd)
        else:
            os.mknod(tmp, fmt | 0o600, st.st_rdev, dir_fd=dfd)
        h, made = created_handle(dfd, tmp, fmt, temps.owner_probe(where, dfd))
        try:
            probs = meta.apply_handle(h, st, xattrs)
        finally:
            os.close(h)
        rename_checked(dfd, tmp, name, identity(made))
    return ("symlink" if stat.S_ISLNK(st.st_mode) else "special"), probs
