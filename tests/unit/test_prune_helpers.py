"""Helpers for prune/repair tests: snapshots built through the real Repository API."""

from __future__ import annotations

import time

import msgspec

from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.objects.reader import read_ref
from deltavault.objects.walk import walk
from deltavault.repository.repository import Repository


def save_tree(repo: Repository, files: dict[str, bytes], subdirs: dict[str, bytes] | None = None) -> bytes:
    nodes = []
    for name, data in files.items():
        bid, _ = repo.save_blob(BlobType.DATA, data)
        nodes.append(Node(name=name.encode(), type=NodeType.FILE, size=len(data), mode=0o644,
                          content=[Full(bid, len(data))]))
    for name, tid in (subdirs or {}).items():
        nodes.append(Node(name=name.encode(), type=NodeType.DIR, mode=0o755, subtree=tid))
    nodes.sort(key=lambda n: n.name)
    tid, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(nodes)))
    return tid


def save_snapshot(repo: Repository, files: dict[str, bytes], *, host: str = "h",
                  paths: tuple[str, ...] = ("/data",), sub: dict[str, bytes] | None = None) -> str:
    """A snapshot whose root has ``files`` plus, optionally, a directory 'sub' with ``sub``."""
    subdirs = {"sub": save_tree(repo, sub)} if sub else None
    tid = save_tree(repo, files, subdirs)
    repo.flush()
    ns = time.time_ns()
    return repo.save_snapshot(Snapshot(time="t", time_ns=ns, hostname=host, paths=list(paths), tree=tid))


def snapshot_files(repo: Repository, sid: str) -> dict[str, bytes]:
    snap = repo.load_snapshot(sid)
    assert snap.tree is not None
    out = {}
    for path, node in walk(repo, snap.tree):
        if node.type == NodeType.FILE:
            out[path.decode()] = b"".join(read_ref(repo, r) or b"" for r in node.content)
    return out
