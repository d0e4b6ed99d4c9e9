"""What a volume backup keeps between runs: the previous snapshot's manifest, a local cache
of its META blobs, and the local state file (leftovers of interrupted runs to clean up).

Everything here can be lost: the manifest and its blobs are in the repository, and the
cache only saves downloads. A damaged cache entry is noticed (it is checked against its
blob id) and fetched again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import blake3
from pyroaring import BitMap

from deltavault.errors import DeltavaultError
from deltavault.fs.files import write_cache_file
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.model.volume import BlockMap, VolumeManifest, decode
from deltavault.tracking import pagesets


class MetaRepo(Protocol):
    def load_blob(self, blob_id: bytes) -> bytes: ...

    def blob_id(self, data: bytes | memoryview) -> bytes: ...

    def save_blob(self, btype: BlobType, data: bytes | memoryview, *, blob_id: bytes | None = None,
                  level: int | None = None, compress: bool = True) -> tuple[bytes, int]: ...


class MetaStore:
    """META blobs of volume snapshots, read through a local cache checked against blob ids."""

    def __init__(self, repo: MetaRepo, cache_dir: Path | None) -> None:
        self.repo = repo
        self.dir = cache_dir
        self.downloaded = 0

    def _path(self, blob_id: bytes) -> Path | None:
        return self.dir / blob_id.hex() if self.dir is not None else None

    def get(self, blob_id: bytes) -> bytes:
        path = self._path(blob_id)
        if path is not None:
            try:
                data = path.read_bytes()
                if self.repo.blob_id(data) == blob_id:
                    return data
            except OSError:
                pass
        data = self.repo.load_blob(blob_id)
        self.downloaded += len(data)
        self._cache(blob_id, data)
        return data

    def put(self, data: bytes) -> bytes:
        bid, _ = self.repo.save_blob(BlobType.META, data)
        self._cache(bid, data)
        return bid

    def _cache(self, blob_id: bytes, data: bytes) -> None:
        path = self._path(blob_id)
        if path is None or path.exists():
            return
        write_cache_file(path, data)

    def keep_only(self, ids: set[bytes]) -> None:
        if self.dir is None or not self.dir.is_dir():
            return
        keep = {i.hex() for i in ids}
        for p in self.dir.iterdir():
            if p.name not in keep:
                p.unlink(missing_ok=True)

    def block_map(self, blob_id: bytes) -> BlockMap:
        return decode(self.get(blob_id), BlockMap, f"block map {blob_id.hex()[:16]}")


@dataclass
class PrevVolume:
    snapshot_id: str
    snapshot: Snapshot
    manifest: VolumeManifest
    zero: BitMap
    free: BitMap


class SnapshotSource(Protocol):
    def list_snapshots(self) -> list[tuple[str, Snapshot]]: ...

    def resolve_snapshot(self, ref: str, *, source_id: str | None = None) -> tuple[str, Snapshot]: ...


def find_previous(repo: SnapshotSource, meta: MetaStore, source_id: str,
                  parent: str | None) -> tuple[PrevVolume | None, str]:
    """The snapshot to compare with, or None and the reason there is none."""
    if parent is not None:
        sid, snap = repo.resolve_snapshot(parent)
    else:
        cands = [s for s in repo.list_snapshots() if s[1].kind == "volume" and s[1].source_id == source_id]
        if not cands:
            return None, "first backup of this volume"
        sid, snap = cands[-1]
    if snap.volume is None:
        return None, f"snapshot {sid[:8]} is not a volume snapshot"
    try:
        manifest = decode(meta.get(snap.volume), VolumeManifest, f"volume manifest of {sid[:8]}")
    except DeltavaultError as exc:
        return None, f"the previous snapshot {sid[:8]} cannot be read ({exc})"
    return PrevVolume(sid, snap, manifest, pagesets.load(manifest.zero), pagesets.load(manifest.free)), ""


@dataclass
class LocalState:
    """Per-volume state file: handles this client created that a killed run may have left
    behind (qemu bitmaps, btrfs snapshots), to remove at the next successful run."""

    path: Path | None
    pending: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, cache_dir: Path | None, source_id: str) -> LocalState:
        if cache_dir is None:
            return cls(None)
        path = cache_dir / "volumes" / blake3.blake3(source_id.encode()).hexdigest()[:32] / "state.json"
        try:
            data = json.loads(path.read_text())
            return cls(path, [p for p in data.get("pending", []) if isinstance(p, dict)])
        except (OSError, ValueError):
            return cls(path)

    @property
    def dir(self) -> Path | None:
        return self.path.parent if self.path is not None else None

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pending": self.pending}))
            os.replace(tmp, self.path)
        except OSError:
            pass

    def add_pending(self, kind: str, handle: str, where: str) -> None:
        self.pending.append({"kind": kind, "handle": handle, "where": where})
        self.save()

    def drop_pending(self, handle: str) -> None:
        self.pending = [p for p in self.pending if p.get("handle") != handle]
        self.save()
