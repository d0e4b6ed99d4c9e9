"""Walking snapshot trees (ls, diff, stats, check)."""

from __future__ import annotations

from collections.abc import Iterator

from deltavault.model.nodes import Node, NodeType
from deltavault.objects.store import BlobLoader
from deltavault.objects.trees import load_nodes


def walk(repo: BlobLoader, tree_id: bytes, prefix: bytes = b"", *,
         dedupe_trees: set[bytes] | None = None) -> Iterator[tuple[bytes, Node]]:
    """(path, node) pre-order. With ``dedupe_trees``, a subtree seen before is not descended
    again (for counting unique data)."""
    stack: list[tuple[bytes, bytes]] = [(prefix, tree_id)]
    while stack:
        path, tid = stack.pop()
        nodes = load_nodes(repo, tid)
        subdirs = []
        for n in nodes:
            p = path + b"/" + n.name if path else n.name
            yield p, n
            if n.type == NodeType.DIR and n.subtree is not None:
                if dedupe_trees is not None:
                    if n.subtree in dedupe_trees:
                        continue
                    dedupe_trees.add(n.subtree)
                subdirs.append((p, n.subtree))
        stack.extend(reversed(subdirs))


def find(repo: BlobLoader, tree_id: bytes, path: str) -> Node | None:
    parts = [p.encode("utf-8", "surrogateescape") for p in path.strip("/").split("/") if p]
    node: Node | None = None
    tid: bytes | None = tree_id
    for part in parts:
        if tid is None:
            return None
        node = next((n for n in load_nodes(repo, tid) if n.name == part), None)
        if node is None:
            return None
        tid = node.subtree
    return node
