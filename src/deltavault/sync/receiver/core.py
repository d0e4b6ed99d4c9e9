"""The receiving side: what the local engine (sync/local) and the agent at the far end of
ssh (receiver/agent.py) both do in DST once they know what SRC has. Deciding what to
fetch differs (the local engine reads SRC itself; the agent asks the sender), but making
directories, keeping or correcting an entry, placing symlinks and device nodes, deleting
extras, installing a staged file, setting directory metadata and linking hard-link groups
are one piece of code, here, through the checked handles of receiver/entries.py.

Each step counts, logs and reports through the run's ``Outcomes``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from deltavault.fs.dirfd import (
    Identity,
    Replaced,
    created_dir,
    identity,
    open_dir_checked,
    rename_checked,
)
from deltavault.fs.meta import take_dir
from deltavault.fs.paths import display
from deltavault.fs.takeroot import TakenRoot
from deltavault.sync.data import BufferPool
from deltavault.sync.filters import Filter
from deltavault.sync.guard import Guard, mount_root
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.entries import Xattrs, delete_extras, fix_meta, to_take
from deltavault.sync.receiver.links import (
    Groups,
    detach,
    hard_link,
    link_failed,
    link_target,
    needs_copy,
    regular_at,
)
from deltavault.sync.receiver.ntfs import AgentNtfs
from deltavault.sync.receiver.remove import remove_entry
from deltavault.sync.receiver.root import give_back, take_root
from deltavault.sync.receiver.specials import place_special
from deltavault.sync.receiver.temps import Temps, Where, unlink_quiet
from deltavault.sync.receiver.verify import verify_written
from deltavault.sync.report import Outcomes

_COUNTERS = {"same": "files_same", "meta": "meta_fixed", "symlink": "symlinks", "special": "special",
             "hardlink": "hardlinks"}


@dataclass
class Staged:
    """A file's new content, written and waiting to be renamed into place."""

    tmp: bytes | None  # None: written in place (--inplace)
    action: str  # new | update | delta
    written: int
    ident: Identity  # the file written (checked again before verifying and linking)
    digest: bytes | None = None  # BLAKE3 of what was meant (for --verify)
    reflinked: bool = False
    note: str | None = None  # for the file's log line (NTFS metadata DST could not keep)


class Receiver:
    """One run's receiving side. ``root``: DST's root fd, set once it is open (the caller
    owns it). ``unmarked_groups``: a group's first file may be unknown to this run (an
    older sender marks no groups): then the regular file at its path is linked to."""

    def __init__(self, opts: SyncOptions, meta: MetaPolicy, out: Outcomes, buffers: BufferPool, filter: Filter,
                 *, cancelled: Callable[[], bool] = lambda: False, unmarked_groups: bool = False) -> None:
        self.opts, self.meta, self.out, self.buffers, self.filter = opts, meta, out, buffers, filter
        self.root = -1
        self.guard: Guard | None = None
        self.temps = Temps()
        self.groups = Groups()
        self._cancelled = cancelled
        self._unmarked = unmarked_groups
        self.ntfs: AgentNtfs | None = None  # the agent's NTFS part (feature "ntfs"; the local engine has its own)
        self.taken: TakenRoot | None = None  # DST's root as it was before the run took it (receiver/root.py)
        self._root_src = os.stat_result((0,) * 10)  # SRC's root, when it was taken

    # ------------------------------------------------------------------ entries
    def removed(self, rel: bytes, st: os.stat_result) -> None:
        self.out.count(deleted=1)
        self.out.done("delete", rel, st.st_size if stat.S_ISREG(st.st_mode) else 0)

    def delete_extras(self, dfd: int, rel: bytes, keep: set[bytes], included: bool) -> None:
        """--delete: the entries of DST/rel not in ``keep`` and not protected by the filters."""
        delete_extras(dfd, rel, lambda n, crel: n in keep or self.filter.protects(crel, n, included=included),
                      self.removed, self.out.problem)

    def clear_dir(self, dfd: int, name: bytes, rel: bytes) -> bool:
        """A directory in DST stands where SRC has a file: only --delete removes it."""
        if not self.opts.delete:
            self.out.problem(rel, "write", "a directory is in the way in the destination (--delete replaces it)")
            return False
        remove_entry(dfd, name, rel, self.removed)
        return True

    def special(self, dfd: int, where: Where, name: bytes, rel: bytes, st: os.stat_result, target: bytes,
                xattrs: Xattrs) -> None:
        """A symlink (to ``target``), FIFO or device node, kept or placed."""
        action, probs = place_special(dfd, where, name, st, target, xattrs, self.meta, self.temps)
        self.meta_problems(rel, probs)
        self.out.count(**{_COUNTERS[action]: 1})
        self.out.done(action, rel)

    def keep(self, dfd: int, name: bytes, rel: bytes, st: os.stat_result, dst: os.stat_result, xattrs: Xattrs,
             *, group: bool) -> bool:
        """DST/rel (met as ``dst``) has SRC's content: correct metadata that differs. False:
        it must be written anew (its metadata differs, and it has other links, maybe to a
        file outside DST). ``group``: the first name of a hard-link group."""
        action, probs, ident = fix_meta(dfd, name, st, dst, xattrs, self.meta)
        if action == "replace":
            return False
        self.meta_problems(rel, probs)
        if group:
            self.groups.kept(rel, ident)
        self.out.count(**{_COUNTERS[action]: 1})
        self.out.done(action, rel, st.st_size)
        return True

    def meta_problems(self, rel: bytes, messages: list[str]) -> None:
        for m in messages:
            self.out.problem(rel, "metadata", m)

    # ------------------------------------------------------------------ directories
    def subdir(self, dfd: int, name: bytes, rel: bytes, dst: os.stat_result | None, src: os.stat_result,
               parent_mnt: int) -> tuple[int, os.stat_result, bool, int] | None:
        """DST/rel made (mode 0700 until its metadata is set) or opened, and checked: the
        directory made, or the one met as ``dst``; a file in its way is removed. One met
        that another user owns, that is not ``owned`` as SRC's ``src`` would be, or that lets
        group or others further in than SRC's mode will, is first made ours alone, as one
        made is (``entries.to_take``, fs.meta.take_dir). Returns (fd, its stat, made, its
        mount id); None for a mount showing SRC or DST, left alone (reported)."""
        if dst is not None and not stat.S_ISDIR(dst.st_mode):
            os.unlink(name, dir_fd=dfd)  # a file where SRC now has a directory
            dst = None
        if dst is None:
            os.mkdir(name, 0o700, dir_fd=dfd)
            self.out.count(dirs_created=1)
            fd, st = created_dir(dfd, name, self.temps.owner_probe((rel.rpartition(b"/")[0], None), dfd))
            return fd, st, True, parent_mnt
        fd = open_dir_checked(dfd, name, identity(dst))
        try:
            is_root, mnt = mount_root(fd, parent_mnt)
            why = self.guard.overlap(fd) if is_root and self.guard is not None else None
        except BaseException:
            os.close(fd)
            raise
        if why is not None:
            os.close(fd)
            self.out.problem(rel, "write", f"left alone: {why} (a mount inside the destination)")
            return None
        # Another user's (planted, maybe with a default ACL), or open to users SRC's mode
        # shuts out, who would see what is written in it until its metadata is set, last.
        if to_take(dst, src, self.meta):
            try:
                take_dir(fd, dst)
            except BaseException:
                os.close(fd)
                raise
        return fd, dst, False, mnt

    def take_root(self, src: os.stat_result, dst: bytes) -> None:
        """Before anything is written in DST: its root ours alone if others own or reach it
        (receiver/root.py); ``src``: SRC's root."""
        self.taken = take_root(self.root, src, self.meta, dst)
        self._root_src = src

    def release_root(self) -> None:
        """At the end of a run that did not set the root's metadata (cut short: an error, a
        full disk, the sender gone): the root gets SRC's root's mode, owner and times as of
        the start, as a completed run gives it (every entry in it is complete, or a
        directory still 0700 and ours), not the state it was taken from, which may be
        more open than SRC's. Nothing if it was not taken."""
        if self.taken is not None and self.root >= 0:
            self.dir_meta(self.root, b"", self._root_src, None)

    def dir_meta(self, fd: int, rel: bytes, st: os.stat_result, xattrs: Xattrs) -> None:
        """A directory's own metadata, once everything in it is in place (DST's root: first
        what the run took of it and does not set, given back)."""
        if not rel and self.taken is not None:
            self.meta_problems(rel, give_back(fd, self.taken, st, self.meta))
            self.taken = None
        self.meta_problems(rel, self.meta.apply_fd(fd, st, xattrs))

    # ------------------------------------------------------------------ files
    def new_file(self, where: Where, dfd: int, name: bytes, mode: int = 0o600) -> tuple[bytes, int]:
        """A new file under a registered temp name in ``dfd``: (the name, an fd to write)."""
        tmp = self.temps.new(where, name)
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                mode, dir_fd=dfd)
        except BaseException:
            self.temps.done(where, tmp)
            raise

    def discard(self, where: Where, dfd: int, tmp: bytes) -> None:
        """A temp file that will not be installed."""
        unlink_quiet(dfd, tmp)
        self.temps.done(where, tmp)

    def finish_file(self, fd: int, rel: bytes, st: os.stat_result, xattrs: Xattrs, *, chown: bool = True,
                    chmod: bool = True) -> Identity:
        """A written file's metadata, set through its fd (``chown``, ``chmod`` False: it was
        made with them); synced to the disk for --verify. Returns its identity."""
        for m in self.meta.apply_fd(fd, st, xattrs, chmod=chmod, chown=chown):
            self.out.problem(rel, "metadata", m)
        if self.opts.verify:
            os.fsync(fd)
        return identity(os.fstat(fd))

    def install(self, dfd: int, where: Where, name: bytes, rel: bytes, st: os.stat_result, staged: Staged, *,
                group: bool) -> None:
        """Verify (--verify) and rename a staged file into place, then count and log it. A
        file that reads back other bytes is kept aside and reported; one whose temp name no
        longer names it (``rename_checked``) is not installed, and reported. ``group``: the first
        name of a hard-link group (its names are linked to this file at the end)."""
        current = staged.tmp if staged.tmp is not None else name
        if self.opts.verify and staged.digest is not None:
            n, problem = verify_written(dfd, current, name, staged.ident, st.st_size, staged.digest,
                                        self.buffers.size)
            self.out.count(bytes_verified=n, files_verified=1)
            if problem is not None:
                if staged.tmp is not None:
                    self.temps.done(where, staged.tmp)  # renamed aside
                self.out.problem(rel, "verify", problem, size=st.st_size)
                return
        if staged.tmp is not None:
            try:  # (another user who may write in the directory may have swapped the temp file)
                rename_checked(dfd, staged.tmp, name, staged.ident)
            except Replaced as exc:  # (what they put under either name is left alone)
                self.out.problem(rel, "write", f"not installed: {exc.strerror}", size=st.st_size)
                return
            except BaseException:
                unlink_quiet(dfd, staged.tmp)
                raise
            finally:
                self.temps.done(where, staged.tmp)
        if group:
            self.groups.installed(rel, staged.ident, staged.action)
        if staged.action == "delta":
            self.out.count(files_delta=1, delta_bytes_written=staged.written, delta_file_bytes=st.st_size,
                           delta_reflinked=int(staged.reflinked))
        elif staged.action == "update":
            self.out.count(files_updated=1, bytes_copied=staged.written)
        else:
            self.out.count(files_new=1, bytes_copied=staged.written)
        if staged.note is not None:
            self.out.count(ntfs_not_kept=1)
        self.out.done(staged.action, rel, st.st_size, written=staged.written,
                      digest=staged.digest if self.opts.verify else None, note=staged.note)

    # ------------------------------------------------------------------ hard links
    def make_links(self) -> None:
        """Each group's names linked to the file installed or kept for it, through a handle
        checked to be that file."""
        for first, rels in self.groups.by_first().items():
            if self._cancelled():
                return
            try:
                h, hst = self._link_source(first, rels)
            except OSError as exc:
                for rel in rels:
                    self.out.problem(rel, "write", link_failed(first, exc))
                continue
            try:
                for rel in rels:
                    if self._cancelled():
                        return
                    try:
                        self._link(rel, first, h, hst)
                    except OSError as exc:
                        self.out.os_problem(rel, exc)
            finally:
                os.close(h)

    def _link_source(self, first: bytes, rels: list[bytes]) -> tuple[int, os.stat_result]:
        """A handle to the file a group's names are linked to: the one installed or kept for
        it, replaced by a copy first when it has links outside the group."""
        ident, installed = self.groups.targets.get(first, (None, False))
        if ident is not None:
            h, hst = link_target(self.root, first, ident)
        elif self._unmarked:
            h, hst = regular_at(self.root, first)
        else:
            raise FileNotFoundError(errno.ENOENT, "not synced")
        if installed or not needs_copy(self.root, first, rels, hst):
            return h, hst
        try:
            copy, cst, problems = detach(self.root, first, h, self.temps, self.buffers)
        finally:
            os.close(h)
        self.meta_problems(first, problems)
        return copy, cst

    def _link(self, rel: bytes, first: bytes, h: int, hst: os.stat_result) -> None:
        action = hard_link(self.root, rel, h, hst, self.temps, lambda fd, n: self.clear_dir(fd, n, rel))
        if action == "blocked":
            return
        if action == "hardlink":
            self.groups.made.add(rel)
        self.out.count(**{_COUNTERS[action]: 1})
        self.out.done(action, rel, hst.st_size, note=f"-> {display(first)}" if action == "hardlink" else None)
