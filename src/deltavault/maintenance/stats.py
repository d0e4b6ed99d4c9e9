"""Repository and snapshot statistics, in restic's modes:

- ``restore-size``: files and bytes a restore of the snapshots would write (each path);
- ``files-by-contents``: files with distinct content, and their bytes (the same content at
  two paths, or in two snapshots, counts once);
- ``raw-data``: the blobs the snapshots use, once each: their size before compression and
  as stored, so deduplication and compression can be read off;
- the default (``summary``) gives the repository's totals and a little of each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from deltavault.model.content import ref_blob_ids
from deltavault.model.nodes import Node, NodeType
from deltavault.objects.trees import load_nodes
from deltavault.objects.volumes import volume_blob_ids
from deltavault.repository.repository import Repository

MODES = ("summary", "restore-size", "files-by-contents", "raw-data")


@dataclass
class RepoStats:
    snapshots: int
    packs: int
    pack_bytes: int
    blobs: int
    blobs_raw_bytes: int
    restore_size: int  # sum of file sizes over the chosen snapshots
    files: int
    unique_raw_bytes: int  # raw size of unique blobs the chosen snapshots use
    dedup_ratio: float
    compression_ratio: float


@dataclass
class ModeStats:
    mode: str
    snapshots: int
    files: int = 0  # restore-size: every path; files-by-contents: distinct contents
    bytes: int = 0  # their size
    blobs: int = 0  # raw-data: distinct blobs used
    raw_bytes: int = 0  # their size before compression
    stored_bytes: int = 0  # their size as stored (compressed, encrypted)
    extra: dict[str, float] = field(default_factory=dict)


class TreeTotals:
    """The files and bytes a restore of a tree writes, each distinct tree read once: a tree
    met again (in another snapshot, or twice in one) adds its sum. Walking every path took
    time in proportion to the paths, and a tampered repository makes a tree of n blobs name
    2^n paths (each level listing the one below twice): ``stats`` never ended. ``on_node``
    sees each node of each distinct tree once."""

    def __init__(self, repo: Repository, on_node: Callable[[Node], None]) -> None:
        self.repo = repo
        self.on_node = on_node
        self.sums: dict[bytes, tuple[int, int]] = {}

    def of(self, root: bytes) -> tuple[int, int]:
        stack: list[_Frame] = [] if root in self.sums else [_Frame(root, load_nodes(self.repo, root))]
        while stack:  # post-order, with our own stack: any depth
            f = stack[-1]
            if f.pos == len(f.nodes):
                stack.pop()
                self.sums[f.tree] = (f.files, f.bytes)
                if stack:
                    stack[-1].files += f.files
                    stack[-1].bytes += f.bytes
                continue
            n = f.nodes[f.pos]
            f.pos += 1
            self.on_node(n)
            if n.type == NodeType.FILE:
                f.files += 1
                f.bytes += n.size
            elif n.type == NodeType.DIR and n.subtree is not None:
                done = self.sums.get(n.subtree)
                if done is None:
                    stack.append(_Frame(n.subtree, load_nodes(self.repo, n.subtree)))
                else:
                    f.files += done[0]
                    f.bytes += done[1]
        return self.sums[root]


@dataclass(slots=True)
class _Frame:
    tree: bytes
    nodes: list[Node]
    pos: int = 0
    files: int = 0
    bytes: int = 0


def compute_stats(repo: Repository, snapshot_ids: list[str] | None = None) -> RepoStats:
    packs = repo.list_pack_names()
    all_ids = repo.snapshot_ids()
    chosen = snapshot_ids if snapshot_ids is not None else all_ids
    restore_size = files = 0
    unique: set[bytes] = set()

    def content(n: Node) -> None:
        if n.type == NodeType.FILE:
            for r in n.content:
                unique.update(ref_blob_ids(r))
    totals = TreeTotals(repo, content)
    for sid in chosen:
        snap = repo.load_snapshot(sid)
        if snap.tree:
            f, b = totals.of(snap.tree)
            files += f
            restore_size += b
        elif snap.volume:
            unique.update(volume_blob_ids(repo, snap.volume))
            if snap.summary:
                restore_size += snap.summary.bytes_total
    blob_ids = list(repo.index.blob_ids())
    raw_total = sum(repo.index.raw_length(b) for b in blob_ids)
    unique_raw = sum(repo.index.raw_length(b) for b in unique)
    pack_bytes = sum(packs.values())
    return RepoStats(
        snapshots=len(all_ids), packs=len(packs), pack_bytes=pack_bytes, blobs=len(blob_ids),
        blobs_raw_bytes=raw_total, restore_size=restore_size, files=files, unique_raw_bytes=unique_raw,
        dedup_ratio=(restore_size / unique_raw) if unique_raw else 0.0,
        compression_ratio=(raw_total / pack_bytes) if pack_bytes else 0.0)


def mode_stats(repo: Repository, mode: str, snapshot_ids: list[str] | None = None) -> ModeStats:
    """One of restic's modes over the chosen snapshots (default: all)."""
    ids = snapshot_ids if snapshot_ids is not None else repo.snapshot_ids()
    out = ModeStats(mode, len(ids))
    contents: set[tuple[bytes, ...]] = set()
    blobs: set[bytes] = set()

    def node(n: Node) -> None:  # each node of each distinct tree, once
        if mode == "raw-data":
            if n.subtree is not None:
                blobs.add(n.subtree)
            blobs.update(b for r in n.content for b in ref_blob_ids(r))
            blobs.update(n.pages or ())
        elif mode != "restore-size" and n.type == NodeType.FILE:
            key = tuple(b for r in n.content for b in (ref_blob_ids(r) or [b"hole%d" % r.size]))
            if key not in contents:
                contents.add(key)
                out.files += 1
                out.bytes += n.size
    totals = TreeTotals(repo, node)
    for sid in ids:
        snap = repo.load_snapshot(sid)
        if snap.volume is not None:
            if mode == "raw-data":
                blobs.add(snap.volume)
                blobs.update(volume_blob_ids(repo, snap.volume))
            elif snap.summary is not None:
                out.files += 1
                out.bytes += snap.summary.bytes_total
            continue
        if snap.tree is None:
            continue
        if mode == "raw-data":
            blobs.add(snap.tree)
        files, nbytes = totals.of(snap.tree)
        if mode == "restore-size":
            out.files += files
            out.bytes += nbytes
    if mode == "raw-data":
        out.blobs = len(blobs)
        for b in blobs:
            loc = repo.index.lookup(b)
            if loc is not None:
                out.raw_bytes += repo.index.raw_length(b)
                out.stored_bytes += loc.length
        out.extra["compression_ratio"] = round(out.raw_bytes / out.stored_bytes, 3) if out.stored_bytes else 0.0
    return out
