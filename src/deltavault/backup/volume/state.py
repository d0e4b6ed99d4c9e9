"""What a volume backup keeps between runs: the previous snapshot's manifest, a local cache
of its META blobs, and the local state file (leftovers of interrupted runs to clean up).

Everything here can be lost: the manifest and its blobs are in the repository, and the
cache only saves downloads. A damaged cache entry is noticed (it is checked against its
blob id) and fetched again.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import blake3
from pyroaring import BitMap

from deltavault.errors import DeltavaultError, Undecodable
from deltavault.framing import decode_json
from deltavault.fs.files import read_cache_file, remove_cache_files, write_cache_file
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.model.volume import BlockMap, VolumeManifest, decode
from deltavault.repository.hosttag import HostTagger, own_parent
from deltavault.tracking.volume import pagesets


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
            data = read_cache_file(path)
            if data is not None and self.repo.blob_id(data) == blob_id:
                return data
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
        if path is None or os.path.lexists(path):
            return
        write_cache_file(path, data)

    def keep_only(self, ids: set[bytes]) -> None:
        if self.dir is None:
            return
        keep = {i.hex() for i in ids}
        remove_cache_files(self.dir, lambda name: name not in keep)

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


def find_previous(repo: SnapshotSource, meta: MetaStore, source_id: str, parent: str | None,
                  tagger: HostTagger) -> tuple[PrevVolume | None, str, str]:
    """The snapshot to compare with, or None and the reason there is none; and why newer
    snapshots of the source were passed over. Found in the repository, it is one this host
    wrote (``tagger``): unchanged blocks are reused from its block maps unread, so a manifest
    planted by another host that shares the repository would put that host's blocks into
    this host's snapshot. An explicit ``parent`` is the user's choice and is trusted."""
    passed = ""
    if parent is not None:
        sid, snap = repo.resolve_snapshot(parent)
    else:
        cands = [s for s in repo.list_snapshots() if s[1].kind == "volume" and s[1].source_id == source_id]
        if not cands:
            return None, "first backup of this volume", ""
        found, passed = own_parent(tagger, cands, "block")
        if found is None:
            return None, "", passed
        sid, snap = found
    if snap.volume is None:
        return None, f"snapshot {sid[:8]} is not a volume snapshot", passed
    try:
        manifest = decode(meta.get(snap.volume), VolumeManifest, f"volume manifest of {sid[:8]}")
    except DeltavaultError as exc:
        return None, f"the previous snapshot {sid[:8]} cannot be read ({exc})", passed
    return PrevVolume(sid, snap, manifest, pagesets.load(manifest.zero), pagesets.load(manifest.free)), "", passed


# What a pending entry may name: the handles tracking/volume/btrfs.py and qemu.py make,
# "dv-" and a checkpoint id (a snapshot path's last component, or a bitmap name).
_HANDLE_NAME = re.compile(r"dv-[A-Za-z0-9_.-]{1,128}")
_KINDS = ("btrfs", "qemu-bitmap")
STATE_VERSION = 2


def _valid_pending(p: object) -> bool:
    if not isinstance(p, dict) or set(p) != {"kind", "handle", "where"}:
        return False
    kind, handle, where = p["kind"], p["handle"], p["where"]
    if not (kind in _KINDS and isinstance(handle, str) and isinstance(where, str) and os.path.isabs(where)):
        return False
    if kind == "btrfs":  # a path to a snapshot this client made
        return (os.path.isabs(handle) and os.path.normpath(handle) == handle
                and _HANDLE_NAME.fullmatch(os.path.basename(handle)) is not None)
    return _HANDLE_NAME.fullmatch(handle) is not None


@dataclass
class LocalState:
    """Per-volume state file: handles this client created that a killed run may have left
    behind (qemu bitmaps, btrfs snapshots), to remove at the next successful run.

    What it names gets deleted, so it is not trusted as found. Every entry must have the
    shape of a handle this client makes (kind, "dv-" name, absolute paths), else it is
    ignored. With ``key`` (Repository.cache_key("volume state"), an encrypted repository)
    the file also carries a keyed BLAKE3 tag over the source id and the entries, and a file
    whose tag does not match is ignored whole: another user cannot name something for us to
    delete. An unencrypted repository has no key; there the file is protected by the cache
    being private (fs.files), and by the shape check. A replayed older file names only
    handles this client made, with random names; deleting one that is gone is a no-op."""

    path: Path | None
    pending: list[dict[str, str]] = field(default_factory=list)
    key: bytes | None = None
    source_id: str = ""
    note: str = ""  # why the file found was not used, if it was not

    @classmethod
    def load(cls, cache_dir: Path | None, source_id: str, *, key: bytes | None = None) -> LocalState:
        if cache_dir is None:
            return cls(None, key=key, source_id=source_id)
        path = cache_dir / "volumes" / blake3.blake3(source_id.encode()).hexdigest()[:32] / "state.json"
        state = cls(path, key=key, source_id=source_id)
        raw = read_cache_file(path)
        if raw is None:
            return state
        try:
            data = decode_json(raw, Any)
        except Undecodable:
            state.note = f"{path} does not parse; ignored"
            return state
        if not isinstance(data, dict):
            state.note = f"{path} does not parse; ignored"
            return state
        pending = data.get("pending", [])
        if key is not None and not (isinstance(pending, list) and isinstance(data.get("mac"), str)
                                    and hmac.compare_digest(data["mac"], state._tag(pending))):
            state.note = (f"{path} fails its authentication (something other than deltavault changed it); "
                          "ignored: leftovers it may name are not removed")
            return state
        if isinstance(pending, list):
            state.pending = [p for p in pending if _valid_pending(p)]
            if len(state.pending) != len(pending):
                state.note = f"{path}: {len(pending) - len(state.pending)} entries are not handles deltavault makes; ignored"
        return state

    def _tag(self, pending: object) -> str:
        assert self.key is not None
        body = json.dumps({"source": self.source_id, "pending": pending}, sort_keys=True).encode()
        return blake3.blake3(body, key=self.key).hexdigest()

    @property
    def dir(self) -> Path | None:
        return self.path.parent if self.path is not None else None

    def save(self) -> None:
        if self.path is None:
            return
        data: dict[str, object] = {"v": STATE_VERSION, "pending": self.pending}
        if self.key is not None:
            data["mac"] = self._tag(self.pending)
        write_cache_file(self.path, json.dumps(data).encode())

    def add_pending(self, kind: str, handle: str, where: str) -> None:
        self.pending.append({"kind": kind, "handle": handle, "where": where})
        self.save()

    def drop_pending(self, handle: str) -> None:
        self.pending = [p for p in self.pending if p.get("handle") != handle]
        self.save()
