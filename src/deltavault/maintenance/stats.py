"""Repository and snapshot statistics."""

from __future__ import annotations

from dataclasses import dataclass

from deltavault.model.content import Full, Patch
from deltavault.model.nodes import NodeType
from deltavault.objects.volumes import volume_blob_ids
from deltavault.objects.walk import walk
from deltavault.repository.repository import Repository


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


def compute_stats(repo: Repository, snapshot_ids: list[str] | None = None) -> RepoStats:
    packs = repo.list_pack_names()
    all_ids = repo.snapshot_ids()
    chosen = snapshot_ids if snapshot_ids is not None else all_ids
    restore_size = files = 0
    unique: set[bytes] = set()
    seen_trees: set[bytes] = set()
    for sid in chosen:
        snap = repo.load_snapshot(sid)
        if snap.tree:
            for _path, n in walk(repo, snap.tree, dedupe_trees=None):
                if n.type == NodeType.FILE:
                    files += 1
                    restore_size += n.size
                    for r in n.content:
                        if isinstance(r, Full):
                            unique.add(r.id)
                        elif isinstance(r, Patch):
                            unique.add(r.base)
                            unique.update(r.patches)
            seen_trees.add(snap.tree)
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
