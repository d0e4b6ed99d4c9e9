"""The walk of a local sync: SRC and DST together, depth first, with an explicit stack (no
depth limit, no path length limit). For each directory: its entries listed through the
filters (sender/source.py), DST's extras deleted first (--delete), then each entry in
turn: a subdirectory entered (or handed to a worker process, local/shards.py), a file
handed to local/files.py, a symlink or special file placed, a further hard link noted.
Each directory is left (local/dirs.py) once the walk has been through everything below it.
"""

from __future__ import annotations

import os
import stat

from deltavault.fs.dirfd import identity, lstat_at
from deltavault.fs.paths import proc_path
from deltavault.sync.local.context import LocalRun
from deltavault.sync.local.dirs import Dir, Dirs
from deltavault.sync.local.files import Files
from deltavault.sync.local.links import Links
from deltavault.sync.local.shards import Shards
from deltavault.sync.sender.source import SourceDir


class Walker:
    def __init__(self, run: LocalRun, dirs: Dirs, files: Files, links: Links, shards: Shards | None) -> None:
        self.run, self.dirs, self.files, self.links, self.shards = run, dirs, files, links, shards

    def walk(self, root: Dir) -> None:
        stack = [root]
        self._list(root)
        closed_below = 1  # stack[1:closed_below] have their fds closed (MAX_OPEN_DIRS)
        while stack:
            d = stack[-1]
            if d.next < len(d.items) and not d.lost and not self.run.cancel.is_set():
                name, crel, st, inc = d.items[d.next]
                d.next += 1
                try:
                    got = self._entry(d, name, crel, st, inc)
                except OSError as exc:
                    self.run.out.os_problem(crel, exc)
                    got = 1
                if isinstance(got, Dir):
                    stack.append(got)
                    self._list(got)
                    closed_below = self.dirs.bound(stack, closed_below)
                else:
                    d.kept += got
                continue
            if d.next < len(d.items):
                d.kept += 1  # not walked to the end: never removed as empty
            stack.pop()
            if stack and stack[-1].dfd < 0:
                self.dirs.reopen(stack, d)
                closed_below = len(stack) - 1
            kept = self.dirs.leave(d, stack[-1] if stack else None)
            if stack:
                stack[-1].kept += kept

    def _list(self, d: Dir) -> None:
        """d's entries to sync, into d.items; extras in DST are deleted first (--delete)."""
        got = self.run.source.list(d.sfd, d.relpath, d.included) if d.listed else None
        if got is None:
            d.kept = 1  # not listed: kept, and nothing deleted in it
            return
        d.items, protected = got
        if self.run.opts.delete and not d.fresh:
            self.run.rx.delete_extras(d.dfd, d.relpath, {i[0] for i in d.items} | set(protected), d.included)

    def _entry(self, d: Dir, name: bytes, relpath: bytes, st: os.stat_result, included: bool) -> int | Dir:
        """The directory to walk next, or how many entries this one keeps in d."""
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            return self._subdir(d, name, relpath, st, included)
        if stat.S_ISREG(mode):
            if st.st_nlink > 1 and self.links.further_name(d, relpath, st):
                return 1
            self.files.submit(d, name, relpath, st)
            return 1
        if stat.S_ISSOCK(mode):
            self.run.out.done("skip", relpath, 0, note="socket: recreated by its server, not copied")
            return 0
        if stat.S_ISLNK(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            self._special(d, name, relpath, st)
            return 1
        self.run.out.done("skip", relpath, 0, note=f"unknown file type {stat.S_IFMT(mode):o}")
        return 0

    def _subdir(self, parent: Dir, name: bytes, relpath: bytes, st: os.stat_result, included: bool) -> int | Dir:
        """Enter a subdirectory: its source opened and checked, its DST directory made or
        opened and checked."""
        sub, kept = self.run.source.open_dir(parent.sfd, parent.smnt, name, relpath, identity(st))
        if sub is None:
            return kept
        try:
            got = self._subdir_opened(parent, name, relpath, sub, included)
        except BaseException:
            os.close(sub.fd)
            raise
        if not isinstance(got, Dir):
            os.close(sub.fd)
        return got

    def _subdir_opened(self, parent: Dir, name: bytes, relpath: bytes, sub: SourceDir, included: bool) -> int | Dir:
        run = self.run
        dst = None if parent.fresh else lstat_at(parent.dfd, name)
        made = run.rx.subdir(parent.dfd, name, relpath, dst, sub.st, parent.dmnt)
        if made is None:
            return 1
        cdfd, dcst, created, dmnt = made
        xattrs = run.source.xattrs(relpath, fd=sub.fd) if run.meta.any_xattrs else None
        if run.ntfs is not None:  # (its streams: here, where both parents are open)
            try:
                xattrs = run.ntfs.dir_streams(parent.sfd, parent.dfd, name, sub.fd, cdfd, relpath, xattrs, run.out)
            except BaseException:
                os.close(cdfd)
                raise
        if sub.skip is None and self.shards is not None and self.shards.wants(relpath):
            ntfs = run.ntfs.read_dir(sub.fd) if run.ntfs is not None else None
            os.close(cdfd)
            self.shards.delegate(parent, relpath, sub.st, created, included, identity(dcst), xattrs, ntfs)
            return 1
        d = self.dirs.enter(parent, relpath, sub.st, sub.fd, cdfd, fresh=created, included=included,
                            dident=identity(dcst), smnt=sub.mnt, dmnt=dmnt, xattrs=xattrs)
        if sub.skip is not None:
            d.listed = False
            run.out.problem(relpath, "skipped", sub.skip)
        return d

    def _special(self, d: Dir, name: bytes, relpath: bytes, st: os.stat_result) -> None:
        """A symlink, FIFO or device node."""
        run = self.run
        is_link = stat.S_ISLNK(st.st_mode)
        try:
            target = os.readlink(name, dir_fd=d.sfd) if is_link else b""
            xattrs = run.source.xattrs(relpath, path=proc_path(d.sfd, name)) if not is_link else None
        except FileNotFoundError:
            run.out.problem(relpath, "vanished", "disappeared before it could be read")
            return
        except OSError as exc:
            run.out.problem(relpath, "unreadable", exc.strerror or str(exc))
            return
        dst = lstat_at(d.dfd, name)
        if dst is not None and stat.S_ISDIR(dst.st_mode) and not run.rx.clear_dir(d.dfd, name, relpath):
            return
        run.rx.special(d.dfd, d.where, name, relpath, st, target, xattrs)
