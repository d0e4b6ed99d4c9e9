"""Which snapshots hold a path: ``find`` walks each snapshot's trees, entering only the
directories below which a pattern could still match (fs.patterns), and remembers what it
found under each subtree, so the many snapshots that share most of their trees cost
little more than one."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from deltavault.fs.sources import SnapshotMatcher
from deltavault.model.nodes import Node, NodeType
from deltavault.model.snapshot import Snapshot
from deltavault.objects.store import BlobLoader
from deltavault.objects.trees import load_nodes

Hit = tuple[bytes, Node]  # path inside the snapshot, its node


class _Found:
    """The matches under one directory: its own, and those of its subdirectories by
    reference (shared with the memo and with every parent, never copied: copying them into
    each directory above held depth x matches, quadratic for a deep tree)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[Hit | _Found] = []


_NONE = _Found()  # the matches of a directory with none: one object for all


@dataclass
class _Dir:
    key: tuple[bytes, bytes]
    path: bytes
    nodes: list[Node]
    i: int = 0
    found: _Found = field(default_factory=_Found)


class Finder:
    def __init__(self, repo: BlobLoader) -> None:
        self.repo = repo
        self._memo: dict[tuple[tuple[str, ...], tuple[bytes, bytes]], _Found] = {}

    def find(self, snap: Snapshot, matcher: SnapshotMatcher) -> list[Hit]:
        """The entries of ``snap`` that match, in path order."""
        if snap.tree is None:
            return []
        return list(_flatten(self._walk(snap.tree, matcher, tuple(snap.paths))))

    def _walk(self, tree: bytes, matcher: SnapshotMatcher, paths: tuple[str, ...]) -> _Found:
        memo = self._memo
        root = _Dir((tree, b""), b"", load_nodes(self.repo, tree))
        stack = [root]
        while stack:
            d = stack[-1]
            if d.i == len(d.nodes):
                stack.pop()
                found = d.found if d.found.items else _NONE
                memo[(paths, d.key)] = found
                if stack and found is not _NONE:
                    stack[-1].found.items.append(found)
                continue
            n = d.nodes[d.i]
            d.i += 1
            path = d.path + b"/" + n.name if d.path else n.name
            if matcher.matches(path):
                d.found.items.append((path, n))
            if n.type != NodeType.DIR or n.subtree is None or not matcher.may_match_below(path):
                continue
            key = (n.subtree, path)
            done = memo.get((paths, key))
            if done is not None:
                if done is not _NONE:
                    d.found.items.append(done)
            else:
                stack.append(_Dir(key, path, load_nodes(self.repo, n.subtree)))
        return root.found


def _flatten(found: _Found) -> Iterator[Hit]:
    """The matches in order, with a stack of our own (any depth)."""
    stack = [iter(found.items)]
    while stack:
        x = next(stack[-1], None)
        if x is None:
            stack.pop()
        elif isinstance(x, _Found):
            stack.append(iter(x.items))
        else:
            yield x
