"""Differences between two snapshot trees, skipping identical subtrees by id."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from deltavault.model.nodes import Node, NodeType
from deltavault.objects.walk import TreeLoader, load_nodes, walk


@dataclass(frozen=True)
class Change:
    kind: str  # "+" added, "-" removed, "M" content changed, "m" metadata only, "T" type changed
    path: bytes
    old: Node | None
    new: Node | None


def _meta_equal(a: Node, b: Node) -> bool:
    strip: dict[str, Any] = dict(content=[], subtree=None, atime=0, ctime=0, inode=0, dev=0, pages=None)
    return msgspec.structs.replace(a, **strip) == msgspec.structs.replace(b, **strip)


def diff_trees(repo: TreeLoader, a: bytes | None, b: bytes | None, prefix: bytes = b"") -> Iterator[Change]:
    if a == b:
        return
    old = {n.name: n for n in load_nodes(repo, a)} if a else {}
    new = {n.name: n for n in load_nodes(repo, b)} if b else {}
    for name in sorted(old.keys() | new.keys()):
        path = prefix + b"/" + name if prefix else name
        o, n = old.get(name), new.get(name)
        if o is None and n is not None:
            yield Change("+", path, None, n)
            if n.type == NodeType.DIR and n.subtree:
                for p, sub in walk(repo, n.subtree, path):
                    yield Change("+", p, None, sub)
        elif n is None and o is not None:
            yield Change("-", path, o, None)
            if o.type == NodeType.DIR and o.subtree:
                for p, sub in walk(repo, o.subtree, path):
                    yield Change("-", p, sub, None)
        elif o is not None and n is not None:
            if o.type != n.type:
                yield Change("T", path, o, n)
                continue
            if o.type == NodeType.DIR:
                if not _meta_equal(o, n):
                    yield Change("m", path, o, n)
                yield from diff_trees(repo, o.subtree, n.subtree, path)
            elif o.content != n.content or o.target != n.target or o.size != n.size:
                yield Change("M", path, o, n)
            elif not _meta_equal(o, n):
                yield Change("m", path, o, n)
