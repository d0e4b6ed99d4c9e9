"""What a file restore restores: ``--include`` patterns (fs.patterns) resolved against the
snapshot's trees into the exact paths they match, so the restore makes only the
directories that lead to something restored, and ``--exclude`` patterns checked on the way.
Includes match a path inside the snapshot (``data/a``) or its original path (``/srv/data/a``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltavault.errors import DeltavaultError
from deltavault.fs.patterns import PatternSet
from deltavault.fs.sources import SnapshotMatcher
from deltavault.model.nodes import Node, NodeType
from deltavault.objects.store import BlobLoader
from deltavault.objects.trees import load_nodes

# Entries of the listings the planning walk keeps for the restore to reuse, at most, in all.
# Past it a listing is let go and the restore loads it again: with --include '**/x' the walk
# reads every directory of the snapshot, and keeping them all made memory grow with the
# snapshot (millions of files a source's users can make), not with what is restored.
KEEP_LISTED = 200_000


@dataclass
class Selection:
    """The chosen paths as a tree of names: ``whole`` takes everything below."""

    whole: bool
    children: dict[bytes, Selection] = field(default_factory=dict)
    # The directory's entries, when the planning walk loaded them: the restore need not
    # load them again.
    listing: list[Node] | None = None
    damaged: bool = False  # its listing could not be read while planning (the restore reports it)


def plan(repo: BlobLoader, tree: bytes, includes: list[str], paths: list[str]) -> tuple[Selection, list[str]]:
    """The selection ``includes`` make in the snapshot whose root is ``tree`` (``paths``: its
    recorded paths), and the patterns that matched nothing. No includes: everything."""
    if not includes:
        return Selection(True), []
    pats = PatternSet(includes)
    matcher = SnapshotMatcher(pats, paths)
    root = Selection(False)
    order: list[Selection] = []  # the directories entered, parents first
    kept = 0  # entries in the listings kept
    stack: list[tuple[bytes, bytes, Selection]] = [(tree, b"", root)]
    while stack:
        tid, prefix, sel = stack.pop()
        order.append(sel)
        try:
            nodes = load_nodes(repo, tid)
        except DeltavaultError:
            sel.damaged = True  # kept, so the restore reaches it and says what was lost there
            continue
        if kept + len(nodes) <= KEEP_LISTED:
            sel.listing = nodes
            kept += len(nodes)
        for n in nodes:
            path = prefix + b"/" + n.name if prefix else n.name
            if matcher.matches(path):
                sel.children[n.name] = Selection(True)
            elif n.type == NodeType.DIR and n.subtree is not None and matcher.may_match_below(path):
                child = Selection(False)
                sel.children[n.name] = child
                stack.append((n.subtree, path, child))
    # drop the directories below which nothing matched, deepest first: no empty directory
    # is made for them
    for sel in reversed(order):
        sel.children = {k: c for k, c in sel.children.items() if c.whole or c.children or c.damaged}
    return root, pats.unused()


class Excluded:
    """``--exclude`` patterns for one snapshot: an entry that matches is not restored, nor
    anything below it."""

    def __init__(self, patterns: list[str], paths: list[str]) -> None:
        self.matcher = SnapshotMatcher(PatternSet(patterns), paths) if patterns else None

    def __call__(self, relpath: bytes) -> bool:
        return self.matcher is not None and self.matcher.matches(relpath)


def selected_totals(repo: BlobLoader, tree: bytes, sel: Selection, excluded: Excluded) -> tuple[int, int]:
    """(bytes, files) of the regular files a restore of ``sel`` writes: the total for its
    progress bar."""
    total = count = 0
    stack: list[tuple[bytes, bytes, Selection]] = [(tree, b"", sel)]
    while stack:
        tid, prefix, s = stack.pop()
        for n in s.listing if s.listing is not None else load_nodes(repo, tid):
            child = s if s.whole else s.children.get(n.name)
            path = prefix + b"/" + n.name if prefix else n.name
            if child is None or excluded(path):
                continue
            if n.type == NodeType.DIR and n.subtree is not None:
                stack.append((n.subtree, path, child))
            elif n.type == NodeType.FILE and child.whole:
                total += n.size
                count += 1
    return total, count
