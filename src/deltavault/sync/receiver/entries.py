"""Entries of DST, reached only through checked handles: what the local engine and the
agent both do to a single entry (delete extras, open or correct an existing file;
symlinks and device nodes are in specials.py). Each returns what happened (and metadata
problems as messages); the caller counts, logs and reports.

Other local users may write in DST while we work (fs.dirfd has the rules). Here:

- An entry found in DST is used only through an ``O_PATH`` handle checked to be the type
  and (dev, ino) that lstat met: a FIFO, device or symlink swapped in is never opened,
  followed or changed.
- An entry found in DST is kept as SRC's only if it belongs to the user the sync would make
  it belong to (``owned``): anyone who can write in DST can plant a file of their own with
  SRC's size and time (utime), and hold it open; a user cannot give a file away. So no
  other user's bytes or inode become the mirror's, nor get SRC's owner and mode (setuid).
- An entry found in DST is changed in place (metadata, --inplace writes) or given another
  name only if DST holds its one link. One with more (``st_nlink > 1``) may be a hard link
  to a file outside DST. Either kind is replaced by a new file instead (``fix_meta`` says
  "replace"). It may be read, through its checked handle, to compare it with SRC or as the
  base of a delta written into a new file: what is written into DST is always SRC's bytes.
- What we create (files, symlinks, FIFOs, device nodes) gets its metadata through its own
  fd or a handle checked to be the entry just made (``created_handle``), then is renamed
  into place.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from deltavault.fs.dirfd import Identity, Replaced, handle_at, identity, reopen
from deltavault.fs.meta import widens
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.receiver.remove import remove_entry

Xattrs = list[tuple[bytes, bytes]] | None
Problem = Callable[[bytes, str, str], None]  # (path, kind, message)
Removed = Callable[[bytes, os.stat_result], None]


def delete_extras(dfd: int, rel: bytes, spare: Callable[[bytes, bytes], bool], removed: Removed,
                  problem: Problem) -> None:
    """Remove the entries of DST/rel for which ``spare(name, path)`` is false."""
    try:
        names = sorted(os.fsencode(n) for n in os.listdir(dfd))
    except OSError as exc:
        problem(rel or b".", "delete", f"destination directory cannot be listed: {exc.strerror}")
        return
    for name in names:
        crel = rel + b"/" + name if rel else name
        if spare(name, crel):
            continue
        try:
            remove_entry(dfd, name, crel, removed)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problem(crel, "delete", exc.strerror or str(exc))


def open_existing(dfd: int, name: bytes, want: os.stat_result, flags: int) -> int:
    """Open the regular file ``name`` that lstat met as ``want``: through a handle checked to
    be that same file (a FIFO or device swapped in is never opened; no symlink followed)."""
    h, st = handle_at(dfd, name)
    try:
        if not stat.S_ISREG(st.st_mode) or identity(st) != identity(want):
            raise Replaced("not the file met in the listing")
        return reopen(h, flags)
    finally:
        os.close(h)


def single(st: os.stat_result) -> bool:
    """May an existing entry be changed in place? Only if DST holds its one link."""
    return st.st_nlink == 1


def owned(have: os.stat_result, src: os.stat_result, meta: MetaPolicy) -> bool:
    """May the existing entry ``have`` be kept as SRC's ``src`` at all? Only if it has the
    owner the sync gives ``src``."""
    return have.st_uid == meta.owner(src)


def to_take(have: os.stat_result, src: os.stat_result, meta: MetaPolicy) -> bool:
    """Must the existing directory ``have`` be made ours alone (fs.meta.take_dir) before
    anything is written in it as SRC's ``src``? If another user owns it (even the one it
    will belong to: while it is theirs they may give it a default ACL, which every entry
    made in it inherits), it is not of the owner the sync gives it, or it lets group or
    others further in than SRC's mode will (fs.meta.widens)."""
    return (have.st_uid != os.geteuid() or not owned(have, src, meta)
            or widens(have, src.st_mode, src.st_gid if meta.chown else None))


def fix_meta(dfd: int, name: bytes, st: os.stat_result, dst: os.stat_result, xattrs: Xattrs,
             meta: MetaPolicy) -> tuple[str, list[str], Identity]:
    """A file whose content is equal: "same", "meta" once differing metadata is corrected,
    or "replace" when it is another user's, or differs and has other links (copy it anew instead). Also returns
    the file's identity."""
    h, hst = handle_at(dfd, name)
    try:
        if not stat.S_ISREG(hst.st_mode) or identity(hst) != identity(dst):
            raise Replaced("not the file met in the listing")
        if not owned(hst, st, meta):
            return "replace", [], identity(hst)
        if not meta.handle_differs(h, hst, st, xattrs):
            return "same", [], identity(hst)
        if not single(hst):
            return "replace", [], identity(hst)
        return "meta", meta.apply_handle(h, st, xattrs), identity(hst)
    finally:
        os.close(h)


