"""Volume snapshots as objects: the manifest, its block maps, and every blob they name.

Restore reads manifests and block maps through here; check, stats and prune's
reachability list a volume snapshot's blobs with ``volume_blob_ids``.
"""

from __future__ import annotations

from collections.abc import Iterator

from deltavault.errors import FormatError
from deltavault.model.content import ref_blob_ids
from deltavault.model.volume import BlockMap, VolumeManifest, block_map_fault, decode
from deltavault.objects.store import BlobLoader


def load_manifest(repo: BlobLoader, manifest_id: bytes) -> VolumeManifest:
    return decode(repo.load_blob(manifest_id), VolumeManifest, f"volume manifest {manifest_id.hex()[:16]}")


def load_block_map(repo: BlobLoader, map_id: bytes) -> BlockMap:
    """A block map, unchecked against its volume: for listing the blobs it names."""
    return decode(repo.load_blob(map_id), BlockMap, f"block map {map_id.hex()[:16]}")


def load_segment_map(repo: BlobLoader, m: VolumeManifest, seg: int) -> BlockMap:
    """The block map of segment ``seg`` of ``m``, checked to cover that segment block by block
    (``model.volume.block_map_fault``): what restore, the mount, check and copy read."""
    map_id = m.segments[seg].map
    bm = load_block_map(repo, map_id)
    fault = block_map_fault(m, seg, bm)
    if fault is not None:
        raise FormatError(f"block map {map_id.hex()[:16]} {fault}")
    return bm


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
