"""Volume snapshots as objects: the manifest, its block maps, and every blob they name.

Restore reads manifests and block maps through here; check, stats and prune's
reachability list a volume snapshot's blobs with ``volume_blob_ids``.
"""

from __future__ import annotations

from collections.abc import Iterator

from deltavault.model.content import ref_blob_ids
from deltavault.model.volume import BlockMap, VolumeManifest, decode
from deltavault.objects.store import BlobLoader


def load_manifest(repo: BlobLoader, manifest_id: bytes) -> VolumeManifest:
    return decode(repo.load_blob(manifest_id), VolumeManifest, f"volume manifest {manifest_id.hex()[:16]}")


def load_block_map(repo: BlobLoader, map_id: bytes) -> BlockMap:
    return decode(repo.load_blob(map_id), BlockMap, f"block map {map_id.hex()[:16]}")


def volume_blob_ids(repo: BlobLoader, manifest_id: bytes) -> Iterator[bytes]:
    """Every blob the manifest references (not the manifest itself). Raises if a block map
    cannot be read: a caller about to delete data must not guess."""
    m = load_manifest(repo, manifest_id)
    for c in m.checkpoints:
        yield from c.state
    maps: set[bytes] = set()
    for seg in m.segments:
        yield seg.digests
        if seg.map in maps:
            continue
        maps.add(seg.map)
        yield seg.map
        for r in load_block_map(repo, seg.map).refs:
            yield from ref_blob_ids(r)
