"""The sender's walk of SRC: each directory as the listing the agent is sent, in depth-first
order, and after everything below it, its end (the agent then sets its metadata).

Iterative (an explicit stack of frames), with at most MAX_OPEN_DIRS of the walk's own
directory fds open: deeper, the shallowest are closed and opened again through ".."
(checked) when the walk climbs back. A listing also holds its directory open until its
files are sent (sender.py bounds how many do).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from deltavault.fs.dirfd import Identity, identity, mount_id
from deltavault.fs.dirstack import bound, climb
from deltavault.fs.paths import proc_path
from deltavault.sync.report import Outcomes
from deltavault.sync.sender.ntfs import SenderNtfs
from deltavault.sync.sender.source import SourceTree, Xattrs
from deltavault.sync.tree import MAX_OPEN_DIRS
from deltavault.sync.wire import GROUP, entry, kind_of


@dataclass
class Listing:
    fd: int  # the directory, open until its files have been sent (-1: it has none)
    rel: bytes
    st: os.stat_result
    included: bool
    xattrs: Xattrs = None  # the directory's own, sent at its end
    win: dict[str, Any] | None = None  # its NTFS metadata (sync/wire.py), sent at its end
    entries: list[list[Any]] = field(default_factory=list)
    protected: list[bytes] = field(default_factory=list)
    files: dict[bytes, os.stat_result] = field(default_factory=dict)
    subdirs: list[tuple[bytes, bytes, bool, Identity]] = field(default_factory=list)
    want: list[tuple[bytes, str]] = field(default_factory=list)
    rid: int = 0  # the request whose reply is awaited (its listing's, then its check's)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class End:
    """A directory's end: everything below it has been listed."""

    listing: Listing


@dataclass(eq=False)
class _Frame:
    """A directory the walk is in: its own fd (to open subdirectories), closed for now (-1)
    when deeper than MAX_OPEN_DIRS."""

    fd: int
    ident: Identity
    mnt: int
    listing: Listing
    next: int = 0  # the next subdirectory


class SourceWalk:
    def __init__(self, source: SourceTree, out: Outcomes, ntfs: SenderNtfs | None = None) -> None:
        self.source, self.out, self.ntfs = source, out, ntfs

    def walk(self, root: int, included: bool) -> Generator[Listing | End, None, None]:
        """Directories in depth-first order, each as its listing and, after everything
        below it, its end."""
        st = os.fstat(root)
        self.source.entered.add(identity(st))
        top = self._list(os.dup(root), b"", st, included)
        if top is None:
            return
        yield top
        stack = [_Frame(os.dup(root), identity(st), -1, top)]
        closed_below = 1  # stack[1:closed_below] have their fd closed
        try:
            stack[0].mnt = mount_id(root)
            while stack:
                f = stack[-1]
                if f.fd >= 0 and f.next < len(f.listing.subdirs):
                    name, crel, inc, ident = f.listing.subdirs[f.next]
                    f.next += 1
                    child = self._enter(f, name, crel, inc, ident)
                    if child is None:
                        continue
                    if isinstance(child, End):
                        yield child
                        continue
                    yield child.listing
                    stack.append(child)
                    closed_below = bound(stack, closed_below, MAX_OPEN_DIRS)
                    continue
                stack.pop()
                if stack and stack[-1].fd < 0:
                    if not climb(stack, f.fd):  # moved meanwhile: the rest of it is not sent (so not deleted)
                        self.out.problem(stack[-1].listing.rel, "changed", "moved during the run; its "
                                         "remaining subdirectories were not synced")
                        stack[-1].next = len(stack[-1].listing.subdirs)
                    closed_below = len(stack) - 1
                os.close(f.fd)
                f.fd = -1
                yield End(f.listing)
        finally:
            for f in stack:
                f.listing.close()
                if f.fd >= 0:
                    os.close(f.fd)

    def _enter(self, parent: _Frame, name: bytes, crel: bytes, included: bool,
               listed: Identity) -> _Frame | End | None:
        """A subdirectory opened, checked and listed; or its end alone when it must not be
        walked (reported "skipped"); None when it cannot be read (reported: the agent
        deletes nothing there)."""
        sub, _kept = self.source.open_dir(parent.fd, parent.mnt, name, crel, listed)
        if sub is None:
            return None
        try:
            if sub.skip is not None:
                self.out.problem(crel, "skipped", sub.skip)
                return End(Listing(-1, crel, sub.st, included, self.source.xattrs(crel, fd=sub.fd)))  # only its end
            listing = self._list(os.dup(sub.fd), crel, sub.st, included)
            if listing is None:
                return None
            out = _Frame(sub.fd, identity(sub.st), sub.mnt, listing)
            sub.fd = -1
            return out
        finally:
            if sub.fd >= 0:
                os.close(sub.fd)

    def _list(self, fd: int, rel: bytes, st_dir: os.stat_result, included: bool) -> Listing | None:
        """Takes ``fd``: the listing keeps it while it has files to send."""
        got = self.source.list(fd, rel, included)
        if got is None:
            os.close(fd)  # no listing goes out, so the agent deletes nothing under here
            return None
        items, protected = got
        d = Listing(fd, rel, st_dir, included, self.source.xattrs(rel, fd=fd), protected=protected)
        if self.ntfs is not None:
            self._dir_win(d)
        for name, crel, st, inc in items:
            kind = kind_of(st)
            if kind is None:
                d.protected.append(name)
                if self.out.log is not None:
                    self.out.log.write("skip", 0, crel, error="socket or unknown type: not copied")
                continue
            try:
                extra: bytes | None = None
                if kind == "l":
                    extra = os.readlink(name, dir_fd=fd)
                elif kind == "f" and st.st_nlink > 1:
                    first = self.source.first_path((st.st_dev, st.st_ino), crel)
                    kind, extra = ("h", first) if first != crel else ("f", GROUP)
                xattrs = self.source.xattrs(crel, path=proc_path(fd, name)) if kind not in ("l", "h") else None
                win = None
                if kind == "f" and self.ntfs is not None:  # (warnings are reported when the file is sent)
                    xattrs, win, _, _ = self.ntfs.file_win(fd, name, proc_path(fd, name), st, xattrs)
                elif kind == "d" and self.ntfs is not None:
                    win, problems = self.ntfs.subdir_win(fd, name, crel, st)
                    for m in problems:
                        self.out.problem(crel, "metadata", m)
            except FileNotFoundError:
                self.out.problem(crel, "vanished", "disappeared before it could be read")
                continue
            except OSError as exc:
                d.protected.append(name)
                self.out.problem(crel, "unreadable", exc.strerror or str(exc))
                continue
            d.entries.append(entry(name, kind, st, extra=extra, xattrs=xattrs, win=win))
            if kind == "d":
                d.subdirs.append((name, crel, inc, identity(st)))
            elif kind == "f":
                d.files[name] = st
            else:
                self.out.reporter.advance(items=1)
        if not d.files:
            d.close()  # nothing will be read from it
        return d

    def _dir_win(self, d: Listing) -> None:
        """A directory's NTFS metadata, sent at its end; what cannot be read is reported."""
        assert self.ntfs is not None
        try:
            d.win, meta = self.ntfs.dir_win(d.fd, d.rel)
        except OSError as exc:
            self.out.problem(d.rel, "metadata", f"NTFS metadata unreadable: {exc.strerror or exc}")
            return
        for m in [*meta.warnings, *meta.losses] if meta is not None else []:
            self.out.problem(d.rel, "metadata", m)
