"""Differences between two snapshot trees, skipping identical subtrees by id."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from deltavault.model.nodes import Node, NodeType
from deltavault.objects.store import BlobLoader
from deltavault.objects.trees import load_nodes
from deltavault.objects.walk import walk


@dataclass(frozen=True)
class Change:
    kind: str  # "+" added, "-" removed, "M" content changed, "m" metadata only, "T" type changed
    path: bytes
    old: Node | None
    new: Node | None


def _meta_equal(a: Node, b: Node) -> bool:
    strip: dict[str, Any] = dict(content=[], subtree=None, atime=0, ctime=0, inode=0, dev=0, pages=None)
    return msgspec.structs.replace(a, **strip) == msgspec.structs.replace(b, **strip)


def diff_trees(repo: BlobLoader, a: bytes | None, b: bytes | None, prefix: bytes = b"") -> Iterator[Change]:
    """Changes from tree ``a`` to tree ``b`` in path order. Iterative (a stack of open
    directory pairs), so trees of any depth are compared."""
    stack = [_Pair(repo, a, b, prefix)] if a != b else []
    while stack:
        top = stack[-1]
        if top.i == len(top.names):
            stack.pop()
            continue
        name = top.names[top.i]
        top.i += 1
        path = top.prefix + b"/" + name if top.prefix else name
        o, n = top.old.get(name), top.new.get(name)
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
                if o.subtree != n.subtree:
                    stack.append(_Pair(repo, o.subtree, n.subtree, path))
            elif o.content != n.content or o.target != n.target or o.size != n.size:
                yield Change("M", path, o, n)
            elif not _meta_equal(o, n):
                yield Change("m", path, o, n)


class _Pair:
    """Two versions of one directory being compared, and the next name to compare."""

    __slots__ = ("i", "names", "new", "old", "prefix")

    def __init__(self, repo: BlobLoader, a: bytes | None, b: bytes | None, prefix: bytes) -> None:
        self.old = {n.name: n for n in load_nodes(repo, a)} if a else {}
        self.new = {n.name: n for n in load_nodes(repo, b)} if b else {}
        self.names = sorted(self.old.keys() | self.new.keys())
        self.prefix = prefix
        self.i = 0
