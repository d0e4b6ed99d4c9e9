"""What the local sync engine and the push agent both do in a destination directory:
delete extras, correct metadata, place symlinks and device nodes, make hard links, open
source files. Each returns what happened (and metadata problems as messages); the caller
counts, logs and reports.

Other local users may write in DST while we work (fs.dirfd has the rules). Here:

- An entry found in DST is used only through an ``O_PATH`` handle checked to be the type
  and (dev, ino) that lstat met: a FIFO, device or symlink swapped in is never opened,
  followed or changed.
- An entry found in DST is changed in place (metadata, --inplace writes) or given another
  name only if DST holds its one link. One with more (``st_nlink > 1``) may be a hard link
  to a file outside DST: it is replaced by a new file instead (``fix_meta`` says
  "replace"). It may be read, through its checked handle, to compare it with SRC or as the
  base of a delta written into a new file: what is written into DST is always SRC's bytes.
- What we create (files, symlinks, FIFOs, device nodes) gets its metadata through its own
  fd or a handle checked to be the entry just made (``created_handle``), then is renamed
  into place.
- Hard links are made from a handle whose identity is the file installed or kept for the
  group, never from a path.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from deltavault.fs.clone import reflink
from deltavault.fs.dirfd import (
    Identity,
    NotRegular,
    Replaced,
    created_handle,
    expect_identity,
    fd_path,
    handle_at,
    identity,
    link_handle,
    lstat_at,
    open_dir_path,
    open_regular,
    reopen,
)
from deltavault.fs.meta import ApplyProblems, apply_meta_fd, read_xattrs
from deltavault.fs.paths import display
from deltavault.sync.data import BufferPool, copy_data, read_back
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.receiver.remove import aside_name, remove_entry

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

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


def fix_meta(dfd: int, name: bytes, st: os.stat_result, dst: os.stat_result, xattrs: Xattrs,
             meta: MetaPolicy) -> tuple[str, list[str], Identity]:
    """A file whose content is equal: "same", "meta" once differing metadata is corrected,
    or "replace" when it differs and has other links (copy it anew instead). Also returns
    the file's identity."""
    h, hst = handle_at(dfd, name)
    try:
        if not stat.S_ISREG(hst.st_mode) or identity(hst) != identity(dst):
            raise Replaced("not the file met in the listing")
        dx = read_xattrs(fd_path(h), follow=True) if xattrs is not None else None
        if not meta.differs(hst, st, dx, xattrs):
            return "same", [], identity(hst)
        if not single(hst):
            return "replace", [], identity(hst)
        return "meta", meta.apply_handle(h, st, xattrs), identity(hst)
    finally:
        os.close(h)


def _is_same_special(h: int, have: os.stat_result, st: os.stat_result, target: bytes) -> bool:
    if stat.S_IFMT(have.st_mode) != stat.S_IFMT(st.st_mode):
        return False
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(b"", dir_fd=h) == target  # the symlink the handle holds
    return have.st_rdev == st.st_rdev


def place_special(dfd: int, name: bytes, st: os.stat_result, target: bytes, xattrs: Xattrs,
                  meta: MetaPolicy, temp: Callable[[bytes], bytes],
                  untemp: Callable[[bytes], None]) -> tuple[str, list[str]]:
    """A symlink (to ``target``), FIFO or device node, made under a temp name and renamed
    into place, or kept when DST has the same. Returns "same", "meta", "symlink" or "special".
    A directory in the way must have been cleared by the caller."""
    try:
        h, have = handle_at(dfd, name)
    except FileNotFoundError:
        h = -1
    if h >= 0:
        try:
            if _is_same_special(h, have, st, target):
                dx = read_xattrs(fd_path(h), follow=True) if xattrs is not None else None
                if not meta.differs(have, st, dx, xattrs):
                    return "same", []
                if single(have):
                    return "meta", meta.apply_handle(h, st, xattrs)
                # other links: it may be one to an entry outside DST; made anew below
        finally:
            os.close(h)
    fmt = stat.S_IFMT(st.st_mode)
    tmp = temp(name)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(target, tmp, dir_fd=dfd)
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(tmp, 0o600, dir_fd=dfd)
    else:
        os.mknod(tmp, fmt | 0o600, st.st_rdev, dir_fd=dfd)
    try:
        h, _ = created_handle(dfd, tmp, fmt)
        try:
            probs = meta.apply_handle(h, st, xattrs)
        finally:
            os.close(h)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        unlink_quiet(dfd, tmp)
        raise
    untemp(tmp)
    return ("symlink" if stat.S_ISLNK(st.st_mode) else "special"), probs


# ---------------------------------------------------------------------------- hard links

def link_target(root: int, first: bytes, want: Identity) -> tuple[int, os.stat_result]:
    """A handle to DST/first, which must be the regular file ``want`` (installed or kept
    by this run for the group). Replaced or FileNotFoundError otherwise."""
    fdir, _, fname = first.rpartition(b"/")
    ffd = open_dir_path(root, fdir)
    try:
        h, st = expect_identity(ffd, fname, want)
    finally:
        os.close(ffd)
    if not stat.S_ISREG(st.st_mode):
        os.close(h)
        raise Replaced("not a regular file")
    return h, st


def link_failed(first: bytes, exc: OSError) -> str:
    """The problem message of a group whose file cannot be linked to."""
    if isinstance(exc, FileNotFoundError):
        return f"hard link to {display(first)}, which was not synced"
    return f"hard link to {display(first)}: {exc.strerror or exc}"


def names_in_place(root: int, rels: list[bytes], want: Identity) -> int:
    """How many of the paths ``rels`` are names of the file ``want`` now."""
    n = 0
    for rel in rels:
        pdir, _, name = rel.rpartition(b"/")
        try:
            pfd = open_dir_path(root, pdir)
        except OSError:
            continue
        try:
            st = lstat_at(pfd, name)
        finally:
            os.close(pfd)
        n += st is not None and (st.st_dev, st.st_ino) == want
    return n


def needs_copy(root: int, first: bytes, rels: list[bytes], handle_st: os.stat_result) -> bool:
    """A kept (not installed) group file gets new names only if every link it has is a name
    of the group in DST: one more may be a hard link to a file outside DST, which must not
    get another name. Then it is first replaced by a copy (``detach``)."""
    names = [first, *rels]
    have = names_in_place(root, names, identity(handle_st))
    return have < len(names) and have != handle_st.st_nlink


def detach(root: int, first: bytes, handle: int, temp: Callable[[bytes], bytes],
           untemp: Callable[[bytes], None], buffers: BufferPool) -> tuple[int, os.stat_result]:
    """Replace DST/first by a copy of the file ``handle`` names (a reflink where the file
    system can), with its metadata; returns a handle to the copy."""
    st = os.fstat(handle)
    fdir, _, fname = first.rpartition(b"/")
    dfd = open_dir_path(root, fdir)
    try:
        src = reopen(handle, os.O_RDONLY)
        tmp = temp(fname)
        try:
            tfd = os.open(tmp, _WRITE_FLAGS, 0o600, dir_fd=dfd)
            try:
                if not reflink(src, tfd):
                    copy_data(src, tfd, st, buffers, None, lambda: False)
                probs = ApplyProblems([])
                apply_meta_fd(tfd, probs, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, atime_ns=st.st_atime_ns,
                              mtime_ns=st.st_mtime_ns, xattrs=read_xattrs(b"", fd=src), owner=os.geteuid() == 0)
                new = identity(os.fstat(tfd))
            finally:
                os.close(tfd)
            os.rename(tmp, fname, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            unlink_quiet(dfd, tmp)
            raise
        finally:
            os.close(src)
        untemp(tmp)
        h, hst = expect_identity(dfd, fname, new)
        return h, hst
    finally:
        os.close(dfd)


def hard_link(root: int, rel: bytes, handle: int, hst: os.stat_result, temp: Callable[[bytes], bytes],
              untemp: Callable[[bytes], None], clear_dir: Callable[[int, bytes], bool]) -> str:
    """Make DST/rel another name of the file ``handle`` names: "hardlink", "same" (it is
    already), or "blocked" (a directory is in the way and ``clear_dir(dir_fd, name)`` did
    not remove it)."""
    pdir, _, name = rel.rpartition(b"/")
    pfd = open_dir_path(root, pdir)
    try:
        cur = lstat_at(pfd, name)
        if cur is not None and (cur.st_dev, cur.st_ino) == identity(hst):
            return "same"
        if cur is not None and stat.S_ISDIR(cur.st_mode) and not clear_dir(pfd, name):
            return "blocked"
        tmp = temp(name)
        link_handle(handle, pfd, tmp)
        try:
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            unlink_quiet(pfd, tmp)
            raise
        untemp(tmp)
        return "hardlink"
    finally:
        os.close(pfd)


# ---------------------------------------------------------------------------- files

def verify_written(dfd: int, current: bytes, name: bytes, want: Identity, size: int, digest: bytes,
                   bufsize: int) -> tuple[int, str | None]:
    """Read back what was written (the file ``want``, now under ``current``), past the page
    cache: (bytes read, None) when it is what was meant, else (bytes read, the problem), the
    file having been renamed aside."""
    h, _ = expect_identity(dfd, current, want)
    try:
        got, n, method = read_back(fd_path(h), bufsize)
    finally:
        os.close(h)
    if n == size and got == digest:
        return n, None
    aside = aside_name(name)
    os.rename(current, aside, src_dir_fd=dfd, dst_dir_fd=dfd)
    return n, f"read back ({method}) {n} bytes that differ from what was written; kept aside as {display(aside)}"


class OpenFailed(Exception):
    """A source file could not be opened: ``kind`` is vanished, changed or unreadable."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def open_source(dir_fd: int, name: bytes) -> int:
    """Open a source file for reading (fs.dirfd.open_regular: through a handle checked to be
    a regular file, so a FIFO or device swapped in is never opened; no symlink followed)."""
    try:
        return open_regular(dir_fd, name)
    except FileNotFoundError:
        raise OpenFailed("vanished", "disappeared before it could be read") from None
    except NotRegular as exc:
        raise OpenFailed("changed", exc.strerror or str(exc)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OpenFailed("changed", "replaced by a symlink while being read") from None
        raise OpenFailed("unreadable", exc.strerror or str(exc)) from None


def unlink_quiet(dir_fd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def changed_since(a: os.stat_result, b: os.stat_result) -> bool:
    """Did a file change between two fstat calls (while it was read)?"""
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) != (b.st_size, b.st_mtime_ns, b.st_ctime_ns)
