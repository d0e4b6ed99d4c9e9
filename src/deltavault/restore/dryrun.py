"""``restore --dry-run``: what a restore with these options would do to its target, found
by walking the snapshot and reading the target, which is not changed (nor created). The
same selection, exclusions and --overwrite and --delete rules as the restore itself."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from deltavault.errors import DeltavaultError, is_damage
from deltavault.fs.dirfd import lstat_at, open_dir_path
from deltavault.fs.paths import display
from deltavault.fs.trusted import open_target_root
from deltavault.model.nodes import Node, NodeType
from deltavault.objects.store import BlobLoader
from deltavault.objects.trees import load_nodes
from deltavault.restore.existing import extras, keep_existing, restored_owner
from deltavault.restore.listing import checked_nodes
from deltavault.restore.options import RestoreOptions
from deltavault.restore.select import Excluded, Selection, plan


@dataclass
class DryRun:
    files: int = 0  # files that would be written
    replaced: int = 0  # of those, replacing an entry already there
    dirs: int = 0
    other: int = 0  # symlinks, FIFOs, devices
    nbytes: int = 0
    skipped: int = 0  # existing entries --overwrite would leave
    deleted: list[bytes] = field(default_factory=list)  # what --delete would remove
    unmatched: list[str] = field(default_factory=list)  # include patterns matching nothing
    unreadable: list[bytes] = field(default_factory=list)  # directories whose listing is damaged


def dry_run(repo: BlobLoader, root_tree: bytes, target: bytes, opts: RestoreOptions) -> DryRun:
    rep = DryRun()
    sel, rep.unmatched = plan(repo, root_tree, opts.include, opts.paths)
    excluded = Excluded(opts.exclude, opts.paths)
    try:  # reached as the restore reaches it (restore/root.py): another user's symlink is refused
        root_fd: int | None = open_target_root(target, "the restore target", create=False)
    except FileNotFoundError:
        root_fd = None  # not there yet: everything would be new
    try:
        stack: list[tuple[bytes, bytes, Selection, bool]] = [(root_tree, b"", sel, root_fd is not None)]
        while stack:
            tid, prefix, s, exists = stack.pop()
            try:
                # The restore's own name check: a ".." or "a/b" from a tampered tree would
                # otherwise open a directory outside the target and list it.
                nodes = checked_nodes(s.listing if s.listing is not None else load_nodes(repo, tid),
                                      display(prefix))
            except DeltavaultError as exc:
                if not is_damage(exc):
                    raise  # the store failed or lied (exit 15), as the restore itself
                rep.unreadable.append(prefix)
                continue
            fd = _open(root_fd, prefix) if exists else None
            try:
                base = prefix + b"/" if prefix else b""
                if fd is not None and opts.delete and s.whole:
                    rep.deleted += [base + n for n in extras(fd, nodes, _below(excluded, base))]
                for n in nodes:
                    child = s if s.whole else s.children.get(n.name)
                    path = base + n.name
                    if child is None or excluded(path):
                        continue
                    st = lstat_at(fd, n.name) if fd is not None else None
                    if n.type == NodeType.DIR:
                        rep.dirs += 1
                        there = st is not None and stat.S_ISDIR(st.st_mode)
                        if n.subtree is not None:
                            stack.append((n.subtree, path, child, there))
                    elif child.whole:
                        _entry(rep, opts, st, n, path)
            finally:
                if fd is not None and fd != root_fd:
                    os.close(fd)
    finally:
        if root_fd is not None:
            os.close(root_fd)
    return rep


def _below(excluded: Excluded, base: bytes) -> Callable[[bytes], bool]:
    return lambda name: excluded(base + name)


def _open(root_fd: int | None, relpath: bytes) -> int | None:
    if root_fd is None:
        return None
    if not relpath:
        return root_fd
    try:
        return open_dir_path(root_fd, relpath)
    except OSError:
        return None


def _entry(rep: DryRun, opts: RestoreOptions, st: os.stat_result | None, n: Node, path: bytes) -> None:
    if keep_existing(opts.overwrite, st, n, restored_owner(n, opts.owner)):
        rep.skipped += 1
        return
    if st is not None and stat.S_ISDIR(st.st_mode) and opts.delete:
        rep.deleted.append(path)
    if n.type == NodeType.FILE:
        rep.files += 1
        rep.nbytes += n.size
    else:
        rep.other += 1
    rep.replaced += st is not None
