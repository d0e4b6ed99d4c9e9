"""Snapshot manifests: the root of one backup run."""

from __future__ import annotations

from typing import Annotated

import msgspec

from deltavault.model.volume import Partition

SNAPSHOT_VERSION = 1
INCOMPLETE_MAX = 100
NOTES_MAX = 10
UNITS_MAX = 65536
# A run's duration, finite (checked on decode): NaN or infinity, which only a hostile writer
# stores, printed ``NaN`` in --json (not JSON) and ended the HTML report with a traceback.
Seconds = Annotated[float, msgspec.Meta(ge=0, le=1e12)]


class Rejection(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A change source a run passed over, and why (the fallback's reason)."""

    source: str
    reason: str


class BlockSets(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Where on a volume a run read and what it found changed, for reports: portable roaring
    bitmaps of units of ``unit`` bytes, the block size or a power-of-two multiple of it that
    keeps a volume within UNITS_MAX units (so at most 8 KiB a bitmap)."""

    unit: Annotated[int, msgspec.Meta(ge=1)]  # 0 divided the report by zero
    read: bytes = b""  # units with any page read from the source
    changed: bytes = b""  # units whose content changed (all of them on a run with no parent)
    partitions: list[Partition] = []


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
    seconds: Seconds = 0.0
    # Added for `deltavault report` (docs/design.md, "Snapshots"). Older snapshots lack them:
    # readers take the defaults, which mean "not recorded".
    change_source: str = ""  # files: catalog | parent-trees | none; volumes: the source used
    rejected: list[Rejection] = []  # sources passed over before ``change_source``, and why
    notes: list[str] = []  # why a volume run read more (first run, resized), the first NOTES_MAX
    file_system: str = ""  # volumes: ext4 | ntfs | partitions, when one was found
    bytes_added_raw: int = 0  # plaintext bytes of the blobs this run added (before zstd)
    blocks_total: int = 0  # volumes: blocks of the volume
    blocks_read: int = 0  # volumes: blocks with any page read from the source
    blocks_changed: int = 0  # volumes: blocks whose content changed (all of them on a first run)
    blocks: BlockSets | None = None  # volumes: which blocks, at a report's resolution
    source_format: str = ""  # volumes: raw | qcow2 | vhdx | vmdk (older snapshots: not recorded)


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
    # Keyed BLAKE3 by the host that wrote it (repository/hosttag.py), over what it binds
    # (kind, source_id, hostname, time_ns, tree, volume): a backup with no local catalog
    # reuses a parent from the repository only if its tag verifies with this host's secret.
    # None: an older version's snapshot, or one whose bound fields were changed (rewrite,
    # copy, repair). Older versions ignore the field.
    host_tag: bytes | None = None
    v: int = SNAPSHOT_VERSION
