"""``tag`` and ``rewrite``: replace a snapshot by an edited copy.

A snapshot's id is the hash of its sealed bytes, so an edit is a new snapshot: saved first,
then the old one is deleted (a crash in between leaves both, never neither). The copy
records the first snapshot of the chain as ``original``.

``rewrite`` drops the entries that match patterns (fs.patterns) from a snapshot's trees:
directories with a dropped entry below them get new trees, bottom up; the others keep
theirs. Nothing else is written: the data only dropped entries used stays in the
repository until the old snapshot is gone and ``prune`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from deltavault.fs.sources import SnapshotMatcher, source_roots
from deltavault.model.nodes import Node, NodeType
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.objects.trees import encode_tree, load_nodes
from deltavault.repository.hosttag import carried_tag
from deltavault.repository.repository import Repository


def new_tags(tags: list[str], *, add: list[str], remove: list[str], set_: list[str] | None) -> list[str]:
    out = list(dict.fromkeys(set_)) if set_ is not None else list(tags)
    out += [t for t in dict.fromkeys(add) if t not in out]
    return [t for t in out if t not in remove]


def replace_snapshot(repo: Repository, sid: str, snap: Snapshot, new: Snapshot) -> str:
    """Save ``new`` in place of ``sid``; returns its id."""
    new = carried_tag(snap, msgspec.structs.replace(new, original=snap.original or sid))
    nid = repo.save_snapshot(new)
    if nid != sid:
        repo.delete_snapshot(sid)
    return nid


@dataclass
class Rewritten:
    tree: bytes | None  # the new root (None: everything would go)
    removed: list[tuple[bytes, Node]]  # the entries dropped (paths inside the snapshot)
    bytes_total: int  # size of the files left


@dataclass
class _Dir:
    tree: bytes
    path: bytes
    nodes: list[Node]
    i: int = 0
    dropped: set[bytes] = field(default_factory=set)  # names of entries that match


def rewrite_tree(repo: Repository, snap: Snapshot, matcher: SnapshotMatcher, *, dry_run: bool) -> Rewritten:
    """The snapshot's tree without what ``matcher`` matches. Unchanged subtrees keep their
    ids; changed ones are stored (unless ``dry_run``). Iterative post-order: any depth."""
    assert snap.tree is not None
    removed: list[tuple[bytes, Node]] = []
    total = 0
    new_ids: dict[bytes, bytes] = {}  # path of a directory that changed -> its new tree id
    stack = [_Dir(snap.tree, b"", load_nodes(repo, snap.tree))]
    while True:
        d = stack[-1]
        if d.i < len(d.nodes):
            n = d.nodes[d.i]
            d.i += 1
            path = _join(d.path, n.name)
            if matcher.matches(path):
                removed.append((path, n))
                d.dropped.add(n.name)
            elif n.type == NodeType.DIR and n.subtree is not None:
                stack.append(_Dir(n.subtree, path, load_nodes(repo, n.subtree)))
            elif n.type == NodeType.FILE:
                total += n.size
            continue
        stack.pop()
        kept = []
        changed = bool(d.dropped)
        for n in d.nodes:
            if n.name in d.dropped:
                continue
            sub = new_ids.get(_join(d.path, n.name)) if n.subtree is not None else None
            if sub is not None:
                n = msgspec.structs.replace(n, subtree=sub)
                changed = True
            kept.append(n)
        tree = d.tree
        if changed:
            raw = encode_tree(kept)
            tree = repo.blob_id(raw) if dry_run else repo.save_blob(BlobType.TREE, raw)[0]
            new_ids[d.path] = tree
        if not stack:
            return Rewritten(tree if kept else None, removed, total)


def _join(base: bytes, name: bytes) -> bytes:
    return base + b"/" + name if base else name


def kept_paths(snap: Snapshot, root_names: set[bytes]) -> list[str]:
    """The snapshot's recorded paths whose entry is still at the top of its tree."""
    keep = {m for r in source_roots(snap.paths) if r.name in root_names for m in r.members}
    return [p for p in snap.paths if p in keep or p.rstrip("/") in keep]
