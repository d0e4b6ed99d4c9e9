"""Snapshot manifests: the root of one backup run."""

from __future__ import annotations

import msgspec

SNAPSHOT_VERSION = 1
INCOMPLETE_MAX = 100


class SnapshotSummary(msgspec.Struct, omit_defaults=True, kw_only=True):
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs: int = 0
    bytes_processed: int = 0  # bytes of file content this run read
    bytes_total: int = 0  # logical size of everything in the snapshot
    bytes_added: int = 0  # bytes this run added to the repository (packs, index)
    bytes_downloaded: int = 0
    blobs_added: int = 0
    errors: int = 0
    # Entries that could not be read (unreadable directories, files that kept changing):
    # the snapshot is partial there. Their paths as shown to users, the first INCOMPLETE_MAX.
    incomplete: list[str] = []
    seconds: float = 0.0


class Snapshot(msgspec.Struct, omit_defaults=True, kw_only=True):
    time: str  # RFC 3339, UTC
    time_ns: int
    hostname: str
    username: str = ""
    kind: str = "files"  # "files" | "volume"
    paths: list[str] = []  # logical source paths (what --as names)
    source_id: str = ""  # key for the catalog and parent selection
    tree: bytes | None = None  # root tree of a files snapshot
    volume: bytes | None = None  # META blob describing a volume snapshot
    parent: str | None = None
    tags: list[str] = []
    summary: SnapshotSummary | None = None
    program: str = ""
    # The snapshot this one replaced (tag, rewrite) or was copied from (copy): the first
    # one of the chain, so each copy or edit can be traced back to the backup that made it.
    original: str | None = None
    v: int = SNAPSHOT_VERSION
