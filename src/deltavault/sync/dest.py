"""What the local sync engine and the push agent both do in a destination directory:
delete extras, correct metadata, place symlinks and device nodes, make hard links, open
source files. Each returns what happened (and metadata problems as messages); the caller
counts, logs and reports."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from deltavault.fs.meta import ApplyProblems, read_xattrs
from deltavault.fs.paths import display, proc_path
from deltavault.sync.copy import read_back
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.tree import aside_name, join, lstat_at, open_dir, remove_entry

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC

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
        crel = join(rel, name)
        if spare(name, crel):
            continue
        try:
            remove_entry(dfd, name, crel, removed)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problem(crel, "delete", exc.strerror or str(exc))


def fix_meta(dfd: int, name: bytes, st: os.stat_result, dst: os.stat_result, xattrs: Xattrs,
             meta: MetaPolicy) -> tuple[str, list[str]]:
    """A file whose content is equal: "same", or "meta" once differing metadata is corrected."""
    fd = os.open(name, _READ_FLAGS, dir_fd=dfd)
    try:
        dx = read_xattrs(b"", fd=fd) if xattrs is not None else None
        if not meta.differs(dst, st, dx, xattrs):
            return "same", []
        return "meta", meta.apply_fd(fd, st, xattrs)
    finally:
        os.close(fd)


def place_special(dfd: int, name: bytes, st: os.stat_result, target: bytes, xattrs: Xattrs,
                  meta: MetaPolicy, temp: Callable[[bytes], bytes],
                  untemp: Callable[[bytes], None]) -> tuple[str, list[str]]:
    """A symlink (to ``target``), FIFO or device node, made under a temp name and renamed
    into place, or kept when DST has the same. Returns "same", "meta", "symlink" or "special".
    A directory in the way must have been cleared by the caller."""
    is_link = stat.S_ISLNK(st.st_mode)
    probs = ApplyProblems([])
    dst = lstat_at(dfd, name)
    if dst is not None and stat.S_IFMT(dst.st_mode) == stat.S_IFMT(st.st_mode) and (
            os.readlink(name, dir_fd=dfd) == target if is_link else dst.st_rdev == st.st_rdev):
        dx = read_xattrs(proc_path(dfd, name)) if xattrs is not None else None
        if not meta.differs(dst, st, dx, xattrs):
            return "same", []
        meta.apply_at(dfd, name, st, xattrs, probs)
        return "meta", probs.messages
    tmp = temp(name)
    if is_link:
        os.symlink(target, tmp, dir_fd=dfd)
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(tmp, 0o600, dir_fd=dfd)
    else:
        os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dfd)
    try:
        meta.apply_at(dfd, tmp, st, xattrs, probs)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        unlink_quiet(dfd, tmp)
        raise
    untemp(tmp)
    return ("symlink" if is_link else "special"), probs.messages


def hard_link(root: int, rel: bytes, first: bytes, temp: Callable[[bytes], bytes],
              untemp: Callable[[bytes], None], clear_dir: Callable[[int, bytes], bool]) -> tuple[str, int]:
    """Make DST/rel another name of DST/first: ("hardlink" | "same" | "missing" | "blocked",
    the file's size). "missing": the first name is not a synced file; "blocked": a directory
    is in the way and ``clear_dir(dir_fd, name)`` did not remove it."""
    pdir, _, name = rel.rpartition(b"/")
    fdir, _, fname = first.rpartition(b"/")
    pfd = open_dir(root, pdir)
    try:
        ffd = open_dir(root, fdir)
        try:
            fst = lstat_at(ffd, fname)
            if fst is None or not stat.S_ISREG(fst.st_mode):
                return "missing", 0
            cur = lstat_at(pfd, name)
            if cur is not None and (cur.st_dev, cur.st_ino) == (fst.st_dev, fst.st_ino):
                return "same", fst.st_size
            if cur is not None and stat.S_ISDIR(cur.st_mode) and not clear_dir(pfd, name):
                return "blocked", fst.st_size
            tmp = temp(name)
            os.link(fname, tmp, src_dir_fd=ffd, dst_dir_fd=pfd, follow_symlinks=False)
            try:
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except BaseException:
                unlink_quiet(pfd, tmp)
                raise
            untemp(tmp)
            return "hardlink", fst.st_size
        finally:
            os.close(ffd)
    finally:
        os.close(pfd)


def verify_written(dfd: int, current: bytes, name: bytes, size: int, digest: bytes,
                   bufsize: int) -> tuple[int, str | None]:
    """Read back what was written, past the page cache: (bytes read, None) when it is what
    was meant, else (bytes read, the problem), the file having been renamed aside."""
    got, n, method = read_back(dfd, current, bufsize)
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
    """Open a source file for reading, without following a symlink, without touching its
    atime where we may."""
    try:
        try:
            return os.open(name, _READ_FLAGS | getattr(os, "O_NOATIME", 0), dir_fd=dir_fd)
        except PermissionError:
            return os.open(name, _READ_FLAGS, dir_fd=dir_fd)  # O_NOATIME needs ownership
    except FileNotFoundError:
        raise OpenFailed("vanished", "disappeared before it could be read") from None
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
