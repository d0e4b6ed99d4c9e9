"""Restore a files snapshot (or chosen paths of it) with its metadata.

The target may hold entries planted by a tampered repository (names are checked to be
single components, duplicates refused) or by another local user who can write there, even
while the restore runs. So the walk never resolves a path: it keeps its own stack of
directory fds, each directory opened by name from its parent's fd with ``O_NOFOLLOW``, and
every entry is made under a temp name, checked, given its metadata through its own fd or
handle and renamed into place (restore/target.py). No path length or depth limit applies
and the Python stack does not grow with depth. Below ``MAX_OPEN_DIRS`` levels the
shallowest directories' fds are let go and opened again through ``..`` on the way back,
where each must be the directory it was (dev, ino).

Regular files are written by regular.py (small ones in batches on the walker's thread, large
ones on workers); a directory's metadata is set once everything below it is written (dirs.py).
"""

from __future__ import annotations

import contextlib
import gc
import os
import stat
import sys
import threading
from dataclasses import dataclass

from deltavault.errors import NO_SPACE_ERRNOS, DeltavaultError, NoSpace, is_damage
from deltavault.fs.dirfd import (
    DIR_FLAGS,
    identity,
    lstat_at,
    raise_nofile_limit,
)
from deltavault.fs.paths import display
from deltavault.model.nodes import Node, NodeType
from deltavault.objects.store import BlobReader
from deltavault.objects.trees import decode_tree
from deltavault.progress import NullReporter, Reporter
from deltavault.restore.dirs import Dir, Holds, reopen_by_name
from deltavault.restore.existing import extras, keep_existing, remove, restored_owner
from deltavault.restore.listing import checked_nodes
from deltavault.restore.ntfsmeta import NtfsTarget
from deltavault.restore.options import RestoreLog, RestoreOptions, RestoreStats
from deltavault.restore.regular import INLINE_BELOW, RegularFiles
from deltavault.restore.root import TargetRoot
from deltavault.restore.select import Excluded, Selection, plan, selected_totals
from deltavault.restore.target import (
    LinkSources,
    MetaOptions,
    final_of,
    made_in,
    make_dir,
    place_special,
    read_umask,
)

# Directory fds the walk keeps open at most (besides those with files in flight), so any
# depth restores within a small RLIMIT_NOFILE.
MAX_OPEN_DIRS = 64
# Subdirectory listings read at a time when their directory is listed, and bytes of them
# kept at most (FileRestorer._read_listings).
LISTINGS_AHEAD = 64
LISTINGS_BYTES = 4 * 1024 * 1024
# Directories held open for their files in flight, at most (dir_budget): past it the walker
# waits for every file queued.
MAX_HELD_DIRS = 1024
_SPECIAL = (NodeType.FIFO, NodeType.CHARDEV, NodeType.BLOCKDEV)
# Python's switch interval while a restore runs (the default is 5 ms): see run().
SWITCH_INTERVAL = 0.0005


def dir_budget(nofile: int) -> int:
    """How many directory fds may be held open (for the files in flight in them) under a
    limit of ``nofile`` open files: a quarter of it, between 2 * MAX_OPEN_DIRS and
    MAX_HELD_DIRS. The small files' batches in flight (up to 3 x 256 files) span about 250
    directories of the benchmark tree: under a budget of 128 the walker drained them (and
    waited for every large file) after every other batch, which left the loading thread and
    the walker each waiting for the other."""
    return max(2 * MAX_OPEN_DIRS, min(nofile // 4, MAX_HELD_DIRS))


def large_first(nodes: list[Node]) -> list[Node]:
    """A directory's entries with its large files first, each group in its own order. The
    workers write large files while the walker goes on, so they start as soon as their
    directory is open rather than after everything listed before them: the benchmark's
    821 MB database, beside the tree, had waited for its 9,737 files and was then written
    on its own, while one core sat idle."""
    large = [n.type == NodeType.FILE and n.size >= INLINE_BELOW for n in nodes]
    if not any(large) or all(large):
        return nodes
    return [n for n, big in zip(nodes, large) if big] + [n for n, big in zip(nodes, large) if not big]


@dataclass
class _Frame:
    dir: Dir
    nodes: list[Node]
    sel: Selection
    pos: int = 0


class FileRestorer:
    def __init__(self, repo: BlobReader, target: str | bytes, options: RestoreOptions,
                 reporter: Reporter | None = None) -> None:
        self.repo = repo
        self.target = os.fsencode(target)
        self.opts = options
        self.reporter = reporter or NullReporter()
        self.log = RestoreLog(self.reporter)
        self.problems = self.log.problems
        self.warnings = self.log.warnings  # said once, not problems (NTFS metadata a target cannot keep)
        self.stats = self.log.stats
        self._meta = MetaOptions(owner=options.owner, setuid=options.setuid)
        self.holds = Holds(self.log, self._meta)
        self._dir_budget = 2 * MAX_OPEN_DIRS  # set by run, from the open-file limit
        self._listings: dict[bytes, bytes] = {}  # subdirectories' listings read ahead (_read_listings)
        self._listed = 0  # their bytes
        self._excluded = Excluded(options.exclude, options.paths)
        self._links: LinkSources | None = None
        self._ntfs: NtfsTarget | None = None  # set by run, once the target is open
        self._umask: int | None = None  # set by run: what files are created with (target.MadeIn)
        self.files: RegularFiles | None = None  # set by run, once the target is open

    # ------------------------------------------------------------------ entry
    def run(self, root_tree: bytes) -> RestoreStats:
        self._dir_budget = dir_budget(raise_nofile_limit())
        with TargetRoot(self.target) as target:  # (taken for the run if others reach it: restore/root.py)
            return self._run(target, root_tree)

    def _run(self, target: TargetRoot, root_tree: bytes) -> RestoreStats:
        fd = target.fd
        root = Dir(fd, identity(os.fstat(fd)), b"", None, None, fresh=False)
        self._umask = read_umask()
        self._links = LinkSources(fd)
        ntfs = NtfsTarget(fd, self.repo, self.log, verify=self.opts.verify)
        self._ntfs = ntfs
        self._meta = self.holds.meta = MetaOptions(owner=self.opts.owner, setuid=self.opts.setuid, last=ntfs.meta,
                                                   unlisted_acls=ntfs.view is not None)
        files = self.files = RegularFiles(self.repo, self.opts, self.log, self.holds, self.reporter, self._meta,
                                          self._links, ntfs)
        self.reporter.start("restore")
        # As in backup (archiver.py): the walk allocates many short-lived, acyclic objects
        # (nodes, listings, blobs), and the cyclic collector scanning them and everything
        # loaded before (the index) took ~0.25 s of a 2 s restore (py-spy). Rarely, not never.
        old_gc = gc.get_threshold()
        gc.set_threshold(200_000, 50, 50)
        gc.freeze()
        # The walker gives the GIL up at each of its ~10 system calls per entry and then waits
        # for whichever thread took it: at most the switch interval when that thread runs
        # Python. A shorter one measured faster (docs/benchmarks.md, *Where the restore's CPU
        # goes*: 1.77 s against 1.93 s, median of 5 interleaved rounds).
        old_switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            sel, unused = plan(self.repo, root_tree, self.opts.include, self.opts.paths)
            for pattern in unused:
                self.log.problem(pattern.encode("utf-8", "surrogateescape"), "missing",
                                 "matches nothing in the snapshot")
            if self.reporter.wants_totals:
                threading.Thread(target=self._totals, args=(root_tree, sel), name="dv-totals", daemon=True).start()
            self._walk(root, root_tree, sel)
            files.drain()
            lost = ntfs.summary()
            if lost is not None:
                self.log.count(ntfs_not_kept=sum(ntfs.lost.values()))
                self.log.warn(b"", lost)
        finally:
            files.close()
            self._links.close()
            for m in target.release():  # once nothing more is written in it, also when cut short
                self.log.problem(b"/", "metadata", m)
            gc.unfreeze()
            gc.set_threshold(*old_gc)
            sys.setswitchinterval(old_switch)
            self.reporter.finish()
        files.check_fatal()
        return self.stats

    def _totals(self, root_tree: bytes, sel: Selection) -> None:
        try:
            nbytes, files = selected_totals(self.repo, root_tree, sel, self._excluded)
        except DeltavaultError:
            return  # the restore reports damage; the bar just has no total
        self.reporter.set_totals(total_bytes=nbytes, total_items=files)

    # ------------------------------------------------------------------ tree walk
    def _listing(self, tree_id: bytes, relpath: bytes, sel: Selection) -> list[Node] | None:
        """A directory's entries, checked; None (reported) when they cannot be read."""
        raw = self._listings.pop(tree_id, None)
        if raw is not None:
            self._listed -= len(raw)
        try:
            nodes = checked_nodes(sel.listing if sel.listing is not None
                                  else decode_tree(raw if raw is not None else self.repo.load_blob(tree_id)).nodes,
                                  display(relpath))
        except DeltavaultError as exc:
            if not is_damage(exc):
                raise  # the store failed or lied: the restore ends, exit 15, as for a file's content
            self.log.problem(relpath or b"/", "corrupt", f"directory listing unreadable: {exc}")
            return None
        if sel.whole:
            self._read_listings(nodes)
        return large_first(nodes)

    def _read_listings(self, nodes: list[Node]) -> None:
        """The listings of a directory's subdirectories, read together now (neighbours in a
        pack in one request) rather than one read each when the walk enters them: 3,027
        reads of the benchmark tree, each an open, a pread and a close on the walker's
        thread. At most LISTINGS_AHEAD at a time and LISTINGS_BYTES kept; a damaged one is
        read again, and reported, when the walk enters it."""
        ids = [n.subtree for n in nodes if n.type == NodeType.DIR and n.subtree is not None
               and n.subtree not in self._listings][:LISTINGS_AHEAD]
        if len(ids) < 2 or self._listed >= LISTINGS_BYTES:
            return
        with contextlib.suppress(DeltavaultError):
            for bid, data in self.repo.load_blobs(ids):
                self._listings[bid] = data
                self._listed += len(data)

    def _delete_extras(self, d: Dir, nodes: list[Node] | None, sel: Selection) -> None:
        """--delete: what the target directory ``d`` holds and the snapshot does not goes,
        when the directory is restored whole and its listing could be read."""
        if not self.opts.delete or not sel.whole or nodes is None or d.fresh:
            return
        base = d.relpath + b"/" if d.relpath else b""
        for name in extras(d.fd, nodes, lambda n: self._excluded(base + n)):
            try:
                remove(d.fd, name)
                self.log.count(deleted=1)
            except OSError as exc:
                self.log.problem(base + name, "delete", exc.strerror or str(exc))

    def _walk(self, root: Dir, tree_id: bytes, sel: Selection) -> None:
        """Depth first, with our own stack: one frame per directory being listed."""
        nodes = self._listing(tree_id, b"", sel)
        self._delete_extras(root, nodes, sel)
        frames = [_Frame(root, nodes or [], sel)]
        files = self.files
        assert files is not None
        while frames:
            files.check_fatal()
            f = frames[-1]
            if f.pos == len(f.nodes):
                frames.pop()
                if self.holds.open_dirs > self._dir_budget:
                    # Directories left behind that wait for files below them hold their fds.
                    files.drain()
                if frames and frames[-1].dir.fd < 0 and not frames[-1].dir.lost:
                    self._reopen(frames, f.dir)
                self.holds.release(f.dir)  # the walker's hold
                continue
            node = f.nodes[f.pos]
            f.pos += 1
            child_sel = f.sel if f.sel.whole else f.sel.children.get(node.name)
            if child_sel is None:
                continue
            relpath = f.dir.relpath + b"/" + node.name if f.dir.relpath else node.name
            if self._excluded(relpath):
                continue
            try:
                sub = self._entry(f.dir, relpath, node, child_sel)
            except NoSpace:
                raise
            except OSError as exc:
                if exc.errno in NO_SPACE_ERRNOS:
                    raise NoSpace(f"restore target is full while writing {display(relpath)}") from exc
                self.log.problem(relpath, "write", exc.strerror or str(exc))
                continue
            if sub is not None:
                frames.append(sub)
                self._let_go(frames)

    def _let_go(self, frames: list[_Frame]) -> None:
        """Close the fd of the directory MAX_OPEN_DIRS levels up (never the target root's),
        unless files are still being written in it."""
        i = len(frames) - 1 - MAX_OPEN_DIRS
        if i < 1:
            return
        d = frames[i].dir
        if d.fd < 0:
            return
        assert self.files is not None
        if d.files and self.files.gathered_in(d):
            self.files.flush_small()
        if self.holds.writing(d):
            return  # a worker writes there; it is closed when the walk comes back
        self.holds.close(d)

    def _reopen(self, frames: list[_Frame], child: Dir) -> None:
        """Open again the directory the walk climbs back into, through ``..`` of the one it
        leaves; it must be the directory it was. If it was moved meanwhile, it is looked up
        by name from the nearest open ancestor, each level checked; failing that, the rest of
        it is not restored."""
        d = frames[-1].dir
        try:
            fd = -1
            if child.fd >= 0:
                fd = os.open(b"..", DIR_FLAGS, dir_fd=child.fd)
                if identity(os.fstat(fd)) != d.ident:
                    os.close(fd)
                    fd = -1
            d.fd = fd if fd >= 0 else reopen_by_name([f.dir for f in frames])
            self.holds.opened()
        except OSError as exc:
            d.lost = True
            frames[-1].pos = len(frames[-1].nodes)
            self.log.problem(d.relpath, "write", f"{exc.strerror or exc}: moved or replaced while the restore ran; "
                          "the rest of this directory is not restored and its metadata not set")

    def _entry(self, parent: Dir, relpath: bytes, node: Node, sel: Selection) -> _Frame | None:
        """Restore one entry of ``parent``; a directory is made and returned as a frame to list."""
        if node.type == NodeType.DIR:
            fd, dst, made = make_dir(parent.fd, node.name, final_of(node, self._meta))
            self.holds.opened()
            sub = Dir(fd, identity(dst), relpath, node, parent, fresh=made)
            if made:
                sub.made = made_in(fd, dst, self._umask)
            if self._ntfs is not None:  # its named streams ("dir:stream"), before its times are set, last
                self._ntfs.streams(parent.fd, node.name, fd, node, relpath)
            self.holds.hold(parent)
            nodes = self._listing(node.subtree, relpath, sel) if node.subtree is not None else []
            self._delete_extras(sub, nodes, sel)
            return _Frame(sub, nodes or [], sel)
        if not sel.whole:
            return None  # a path through a non-directory: nothing selected below
        if not parent.fresh:
            st = lstat_at(parent.fd, node.name)
            if keep_existing(self.opts.overwrite, st, node, restored_owner(node, self.opts.owner)):
                self.log.count(skipped=1)
                self.reporter.advance(nbytes=node.size, items=1)
                return None
            if st is not None and stat.S_ISDIR(st.st_mode):
                if not self.opts.delete:
                    raise IsADirectoryError(f"a directory is in the way of {display(node.name)} (--delete "
                                            "removes it)")
                remove(parent.fd, node.name)
                self.log.count(deleted=1)
        if node.type == NodeType.FILE:
            assert self.files is not None
            self.files.file(parent, relpath, node)
        elif node.type in _SPECIAL and not self.opts.special:
            self.log.count(skipped_special=1)
        elif self._ntfs is not None and self._ntfs.is_reparse_point(node):
            for m in self._ntfs.place_reparse_point(parent.fd, node, shared=not parent.fresh):
                self.log.problem(relpath, "metadata", m)
            self.log.count(special=1)
        else:
            for m in place_special(parent.fd, node, self._meta, shared=not parent.fresh):
                self.log.problem(relpath, "metadata", m)
            self.log.count(special=1)
        return None

    # ------------------------------------------------------------------ files
