"""Summing what a backup will read, in the background, so a terminal progress bar can show
a total and an ETA. It leaves out what the archiver leaves out (options.Excludes, the
skipped paths, other file systems, Source.only), so the total is what the run will see.

Like the archiver's, the walk resolves no path: each directory is opened by name from its
parent's fd with ``O_NOFOLLOW | O_DIRECTORY`` and must be the directory its lstat saw, so
a directory swapped for a symlink (to / or a root-only directory) adds nothing from out of
the tree to the totals, and depth and PATH_MAX do not cut the count short. It holds at most
MAX_OPEN_DIRS directory fds: deeper, the shallowest are closed and opened again through
".." when the walk climbs back (checked; a directory moved meanwhile is not counted on)."""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass

from deltavault.backup.files.options import Excludes, FileBackupOptions, Source
from deltavault.fs.dirfd import Identity, identity, open_dir_at
from deltavault.fs.dirstack import bound, climb
from deltavault.progress import Reporter

MAX_OPEN_DIRS = 128


@dataclass
class _Dir:
    fd: int  # -1: closed for depth (reopened through ".." of its child)
    ident: Identity
    names: list[bytes]
    orig: bytes  # its original path (Excludes match on it)
    path: bytes  # where it is read (skip_paths are compared with it)
    rel: bytes  # its snapshot path
    whole: bool  # everything below is kept
    next: int = 0


class _Totals:
    def __init__(self, opts: FileBackupOptions, excluded: Excludes, root_dev: int, only: set[bytes]) -> None:
        self.opts, self.excluded, self.root_dev, self.only = opts, excluded, root_dev, only
        self.leading = {p[:i] for p in only for i in range(len(p)) if p[i:i + 1] == b"/"}
        self.total = self.count = 0

    def add(self, st: os.stat_result) -> None:
        if stat.S_ISREG(st.st_mode) and not self.excluded.too_large(st):
            self.total += st.st_size
            self.count += 1

    def enter(self, dir_fd: int, name: bytes, st: os.stat_result, orig: bytes, path: bytes, rel: bytes,
              whole: bool) -> _Dir | None:
        """The directory ``name`` of ``dir_fd`` (``st``: its lstat), opened and listed."""
        if self.opts.one_file_system and st.st_dev != self.root_dev:
            return None
        try:
            fd = open_dir_at(dir_fd, name)
        except OSError:
            return None
        try:
            if identity(os.fstat(fd)) != identity(st):
                raise OSError("replaced")
            names = sorted(os.fsencode(n) for n in os.listdir(fd))
            marker = self.excluded.marker(fd, names)
        except OSError:
            os.close(fd)
            return None
        return _Dir(fd, identity(st), [marker] if marker is not None else names, orig, path, rel, whole)

    def child(self, d: _Dir, name: bytes) -> _Dir | None:
        rel = d.rel + b"/" + name
        path = os.path.join(d.path, name)
        orig = d.orig.rstrip(b"/") + b"/" + name
        keep = d.whole or rel in self.only
        if not (keep or rel in self.leading) or path in self.opts.skip_paths or self.excluded(orig):
            return None
        try:
            st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
        except OSError:
            return None
        self.add(st)
        return self.enter(d.fd, name, st, orig, path, rel, keep) if stat.S_ISDIR(st.st_mode) else None

    def walk(self, top: _Dir) -> None:
        stack = [top]
        closed_below = 1  # stack[1:closed_below] have their fd closed
        try:
            while stack:
                d = stack[-1]
                if d.fd >= 0 and d.next < len(d.names):
                    d.next += 1
                    sub = self.child(d, d.names[d.next - 1])
                    if sub is not None:
                        stack.append(sub)
                        closed_below = bound(stack, closed_below, MAX_OPEN_DIRS)
                    continue
                stack.pop()
                if stack and stack[-1].fd < 0:
                    if not climb(stack, d.fd):  # moved meanwhile: the rest of it is not counted
                        stack[-1].next = len(stack[-1].names)
                    closed_below = len(stack) - 1
                if d.fd >= 0:
                    os.close(d.fd)
                    d.fd = -1
        finally:
            for d in stack:
                if d.fd >= 0:
                    os.close(d.fd)


def scan_totals(sources: list[Source], opts: FileBackupOptions) -> tuple[int, int]:
    """(bytes, files) of the regular files a backup with ``opts`` would read at most."""
    excluded = Excludes(opts)
    total = count = 0
    for src in sources:
        # The source itself is looked up by its path, as the archiver does (symlinks in the
        # path the user gave are followed); below it, nothing is.
        parent, fsname = os.path.split(src.path)
        try:
            pfd = os.open(parent or b"/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.stat(fsname or b".", dir_fd=pfd, follow_symlinks=False)
            t = _Totals(opts, excluded, st.st_dev, src.only or set())
            t.add(st)
            top = t.enter(pfd, fsname or b".", st, src.logical or src.path, src.path, src.name,
                          src.only is None) if stat.S_ISDIR(st.st_mode) else None
        except OSError:
            continue
        finally:
            os.close(pfd)
        if top is not None:
            t.walk(top)
        total, count = total + t.total, count + t.count
    return total, count


def start_scanner(sources: list[Source], opts: FileBackupOptions, reporter: Reporter) -> None:
    """Sum sizes in a background thread and hand the totals to ``reporter``."""

    def scan() -> None:
        total, count = scan_totals(sources, opts)
        reporter.set_totals(total_bytes=total, total_items=count)

    threading.Thread(target=scan, name="dv-scan", daemon=True).start()
