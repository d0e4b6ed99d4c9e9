"""Reading SRC, as the local engine and the sender both do: a directory listed through the
filters, a subdirectory entered by fd and checked, a file opened through a checked handle,
extended attributes read; each problem reported to the run's ``Outcomes``.

A subdirectory is opened by name from its parent's fd with O_NOFOLLOW and must be the
(dev, ino) the listing met. A mount root inside SRC that shows SRC, DST or a directory
above either (``Guard.overlap``), or a directory entered already in this run (a bind
mount of one), is not walked: its caller keeps it empty and says why ("skipped").
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass

from deltavault.fs.dirfd import Identity, NotRegular, identity, open_dir_at, open_regular
from deltavault.sync.filters import Filter
from deltavault.sync.guard import Guard, mount_root
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.report import Outcomes
from deltavault.sync.tree import join

Item = tuple[bytes, bytes, os.stat_result, bool]  # name, path, lstat, included
Xattrs = list[tuple[bytes, bytes]] | None


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


def changed_since(a: os.stat_result, b: os.stat_result) -> bool:
    """Did a file change between two fstat calls (while it was read)?"""
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) != (b.st_size, b.st_mtime_ns, b.st_ctime_ns)


@dataclass
class SourceDir:
    """A subdirectory of SRC, opened and checked."""

    fd: int
    st: os.stat_result
    mnt: int  # its mount id
    skip: str | None  # why it must not be walked (kept empty), or None


class SourceTree:
    """One run's reading of SRC. ``where``: how problems name DST ("here" locally, "there"
    from the sending side of a sync with another host). ``guard`` is set once the roots
    are open."""

    def __init__(self, filter: Filter, meta: MetaPolicy, out: Outcomes, *, where: str = "here") -> None:
        self.filter, self.meta, self.out = filter, meta, out
        self.guard: Guard | None = None
        self.entered: set[Identity] = set()  # directories entered: none twice
        self.firsts: dict[tuple[int, int], bytes] = {}  # hard-linked files: the first path met of each
        self._where = where
        self._lock = threading.Lock()  # (a worker's result may register a first path meanwhile)
        self._left: set[bytes] = set()  # entries whose xattrs were not all read (named once)

    def first_path(self, key: tuple[int, int], rel: bytes) -> bytes:
        """The first path met of the file ``key`` (dev, ino): ``rel`` if none was before."""
        with self._lock:
            return self.firsts.setdefault(key, rel)

    def list(self, fd: int, rel: bytes, included: bool) -> tuple[list[Item], list[bytes]] | None:
        """The entries of a directory to sync, sorted by name, and the names --delete must
        leave alone in DST (excluded, unreadable, or files outside the includes). None when
        the directory cannot be listed (reported: then nothing below it is deleted)."""
        try:
            with os.scandir(fd) as it:
                entries = sorted((os.fsencode(e.name), e) for e in it)
        except OSError as exc:
            self.out.problem(rel, "unreadable", f"directory cannot be listed: {exc.strerror}")
            return None
        items: list[Item] = []
        protected: list[bytes] = []
        for name, entry in entries:
            crel = join(rel, name)
            if self.filter.excluded(crel, name):
                protected.append(name)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                self.out.problem(crel, "vanished", "disappeared before it could be read")
                continue
            except OSError as exc:
                protected.append(name)
                self.out.problem(crel, "unreadable", exc.strerror or str(exc))
                continue
            inc = included or self.filter.included(crel, name)
            if not inc and not stat.S_ISDIR(st.st_mode):
                protected.append(name)
                continue
            items.append((name, crel, st, inc))
        return items, protected

    def open_dir(self, parent_fd: int, parent_mnt: int, name: bytes, rel: bytes,
                 listed: Identity) -> tuple[SourceDir | None, int]:
        """A subdirectory opened and checked to be the one listed, with whether it must be
        skipped; or None (reported) and whether its parent keeps a place for it (1: it is
        there but unreadable or replaced; 0: it is gone or no directory now)."""
        try:
            fd = open_dir_at(parent_fd, name)
        except FileNotFoundError:
            self.out.problem(rel, "vanished", "directory disappeared before it could be read")
            return None, 0
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                self.out.problem(rel, "changed", "replaced by a non-directory while being read; not followed")
                return None, 0
            self.out.problem(rel, "unreadable", f"directory cannot be opened: {exc.strerror}")
            return None, 1
        try:
            st = os.fstat(fd)
            if identity(st) != listed:
                self.out.problem(rel, "changed", "replaced by another directory while being read; not synced")
                os.close(fd)
                return None, 1
            is_root, mnt = mount_root(fd, parent_mnt)
            return SourceDir(fd, st, mnt, self._skip(fd, st, is_root)), 1
        except BaseException:
            os.close(fd)
            raise

    def _skip(self, fd: int, st: os.stat_result, is_root: bool) -> str | None:
        """Why a directory must not be walked: a mount root showing SRC, DST or a directory
        of them, or a directory entered already (a bind mount). Registers it as entered."""
        ident = identity(st)
        overlap = self.guard.overlap(fd) if is_root and self.guard is not None else None
        why = None
        if overlap is not None:
            why = f"{overlap}: not synced into itself; kept empty {self._where}"
        elif ident in self.entered:
            why = f"a directory already synced at another path in this run (a bind mount): kept empty {self._where}"
        self.entered.add(ident)
        return why

    def xattrs(self, rel: bytes, *, fd: int | None = None, path: bytes = b"") -> Xattrs:
        """The xattrs to mirror of an entry (by fd, or a /proc path naming it), up to
        fs.meta.INLINE_MAX together, what is left out named once; None when none are
        wanted, or when they cannot be read (reported)."""
        try:
            got = self.meta.source_xattrs(fd=fd, path=path)
        except OSError as exc:
            self.out.problem(rel, "metadata", f"extended attributes unreadable: {exc.strerror}")
            return None
        if got is None:
            return None
        left = got.left()
        if left is not None:
            with self._lock:
                first = rel not in self._left
                self._left.add(rel)
            if first:  # (an entry's xattrs may be read more than once: listed, then sent)
                self.out.problem(rel, "metadata", left)
        return got.values

    def open_file(self, dir_fd: int, name: bytes, rel: bytes, listed: os.stat_result | None = None) -> int | None:
        """A source file opened for reading; None when it cannot be (reported). A file listed
        with other links must still be that inode: its other names are linked to the copy of
        this one, so a file renamed over it in between would lend them its content."""
        try:
            fd = open_source(dir_fd, name)
        except OpenFailed as exc:
            self.out.problem(rel, exc.kind, str(exc))
            return None
        if listed is not None and listed.st_nlink > 1 and identity(os.fstat(fd)) != identity(listed):
            os.close(fd)
            self.out.problem(rel, "changed", "replaced by another file after it was listed; not copied, "
                             "nor are its other names linked")
            return None
        return fd
