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


@dataclass
class _Dir:
    key: tuple[bytes, bytes]
    path: bytes
    nodes: list[Node]
    i: int = 0
    hits: list[Hit] = field(default_factory=list)


class Finder:
    def __init__(self, repo: BlobLoader) -> None:
        self.repo = repo
        self._memo: dict[tuple[tuple[str, ...], tuple[bytes, bytes]], list[Hit]] = {}

    def find(self, snap: Snapshot, matcher: SnapshotMatcher) -> list[Hit]:
        """The entries of ``snap`` that match, in path order."""
        if snap.tree is None:
            return []
        return list(self._walk(snap.tree, matcher, tuple(snap.paths)))

    def _walk(self, tree: bytes, matcher: SnapshotMatcher, paths: tuple[str, ...]) -> Iterator[Hit]:
        memo = self._memo
        root = _Dir((tree, b""), b"", load_nodes(self.repo, tree))
        stack = [root]
        while stack:
            d = stack[-1]
            if d.i == len(d.nodes):
                stack.pop()
                memo[(paths, d.key)] = d.hits
                if stack:
                    stack[-1].hits.extend(d.hits)
                continue
            n = d.nodes[d.i]
            d.i += 1
            path = d.path + b"/" + n.name if d.path else n.name
            if matcher.matches(path):
                d.hits.append((path, n))
            if n.type != NodeType.DIR or n.subtree is None or not matcher.may_match_below(path):
                continue
            key = (n.subtree, path)
            done = memo.get((paths, key))
            if done is not None:
                d.hits.extend(done)
            else:
                stack.append(_Dir(key, path, load_nodes(self.repo, n.subtree)))
        yield from root.hits
