"""The walk ahead of a restore: the progress bar's totals, and the plan of the blobs the
restore will read, in the order it reads them (repository/plan.py), for a read-ahead to keep
the packs read again later (issue #17).

It goes through the trees as the restore's walk does (files.py: depth first, a directory's
large files first, the same selection and excludes, a hard link's later names not read) on
a thread of its own; trees are small, and the walk is far ahead of the restore, which
writes the files. A large file's blobs come at its place in the walk although its segments
are read while the walk goes on: the plan is a hint for which packs go first, not a schedule.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import cast

from deltavault.errors import DeltavaultError
from deltavault.model.content import Full, Patch
from deltavault.model.nodes import Node, NodeType
from deltavault.objects.store import BlobLoader
from deltavault.objects.trees import load_nodes
from deltavault.repository.plan import ReadPlan
from deltavault.restore.listing import checked_nodes
from deltavault.restore.regular import INLINE_BELOW
from deltavault.restore.select import Excluded, Selection


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


KEEP_NODES = 50_000  # entries of listings the walk ahead keeps for the restore, at most


class Listings:
    """Listings the walk ahead read and checked, kept for the restore's walk, which then
    neither reads nor decodes them again (a second decoding of the benchmark's 3,027
    listings cost the restore about 0.3 CPU-s). Thread-safe; at most ``KEEP_NODES`` entries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[bytes, list[Node]] = {}
        self._nodes = 0

    def put(self, tree: bytes, nodes: list[Node]) -> None:
        with self._lock:
            if tree not in self._kept and self._nodes + len(nodes) <= KEEP_NODES:
                self._kept[tree] = nodes
                self._nodes += len(nodes)

    def take(self, tree: bytes) -> list[Node] | None:
        with self._lock:
            nodes = self._kept.pop(tree, None)
            if nodes is not None:
                self._nodes -= len(nodes)
            return nodes

    def __contains__(self, tree: bytes) -> bool:
        return tree in self._kept


def restored_files(repo: BlobLoader, tree: bytes, sel: Selection, excluded: Excluded,
                   damaged: list[bytes], keep: Listings | None = None) -> Iterator[Node]:
    """The regular files a restore of ``sel`` writes, in the order its walk meets them. A
    listing that cannot be read is left out (the restore reports it) and its path added to
    ``damaged``."""
    stack: list[tuple[Iterator[Node], bytes, Selection]] = []
    top = _listing(repo, tree, sel, b"", damaged, keep)
    if top is not None:
        stack.append((iter(top), b"", sel))
    while stack:
        entries, prefix, s = stack[-1]
        n = next(entries, None)
        if n is None:
            stack.pop()
            continue
        child = s if s.whole else s.children.get(n.name)
        path = prefix + b"/" + n.name if prefix else n.name
        if child is None or excluded(path):
            continue
        if n.type == NodeType.DIR and n.subtree is not None:
            nodes = _listing(repo, n.subtree, child, path, damaged, keep)
            if nodes is not None:
                stack.append((iter(nodes), path, child))
        elif n.type == NodeType.FILE and child.whole:
            yield n


def _listing(repo: BlobLoader, tree: bytes, sel: Selection, path: bytes, damaged: list[bytes],
             keep: Listings | None) -> list[Node] | None:
    try:
        nodes = checked_nodes(sel.listing if sel.listing is not None else load_nodes(repo, tree), "")
    except DeltavaultError:
        damaged.append(path)
        return None
    if keep is not None and sel.listing is None:
        keep.put(tree, nodes)
    return large_first(nodes)


def blob_ids(node: Node) -> list[bytes]:
    """The blobs a restore reads for a file, in file order."""
    out: list[bytes] = []
    for r in node.content:
        if isinstance(r, Full):
            out.append(r.id)
        elif isinstance(r, Patch):
            out.append(r.base)
            out.extend(r.patches)
    return out


def start_plan(repo: BlobLoader) -> ReadPlan | None:
    """A plan for ``repo``'s read-ahead to follow (``BlobReader.start_plan``); None when it
    has none (a local or SFTP repository: nothing changes there)."""
    start = getattr(repo, "start_plan", None)
    return cast(ReadPlan | None, start()) if start is not None else None


def end_plan(repo: BlobLoader, plan: ReadPlan | None) -> None:
    end = getattr(repo, "end_plan", None)
    if plan is not None and end is not None:
        end(plan)


class WalkAhead:
    """Plans the reads (``plan``) and counts the bytes and files (given to ``totals``) of a
    restore. ``head_start`` on the restore's thread, before its walk: planned on a thread
    beside it, the plan came too late for the packs the first seconds read (a pack read at
    the start was dropped before the plan named its later readers); ``rest`` on a thread."""

    def __init__(self, repo: BlobLoader, tree: bytes, sel: Selection, excluded: Excluded, plan: ReadPlan | None,
                 totals: Callable[[int, int], None] | None) -> None:
        self._plan = plan
        self._totals = totals
        self._damaged: list[bytes] = []
        self.listings = Listings()
        self._files = restored_files(repo, tree, sel, excluded, self._damaged, self.listings if plan else None)
        self._nbytes = self._count = 0
        self._links: set[tuple[int, int]] = set()  # hard-linked files seen: their other names are links
        self._done = False

    def head_start(self) -> bool:
        """Plan until the plan is full or the walk ends; whether more is left to do."""
        plan = self._plan
        while plan is not None and not plan.full():
            if not self._step():
                return False
        return not self._done

    def rest(self) -> None:
        """The rest of the walk; the plan waits for the restore's reads while full."""
        while self._step():
            pass

    def _step(self) -> bool:
        """One file more; False once there are no more or nothing is left to do."""
        try:
            n = next(self._files, None)
        except DeltavaultError:
            n = None
            self._damaged.append(b"")
        if n is None:
            self._done = True
            if self._totals is not None and not self._damaged:  # the restore reports damage
                self._totals(self._nbytes, self._count)
            return False
        self._nbytes += n.size
        self._count += 1
        if self._plan is None:
            return True
        if n.links > 1:
            if (n.dev, n.inode) in self._links:
                return True
            self._links.add((n.dev, n.inode))
        if not self._plan.add(blob_ids(n)):
            self._plan = None  # the restore is over
            return self._totals is not None
        return True
