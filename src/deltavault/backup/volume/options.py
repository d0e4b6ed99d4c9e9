"""What a volume backup is asked to do and what it reports."""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from pyroaring import BitMap

from deltavault.chunking.fixed import check_block_size
from deltavault.errors import UsageError
from deltavault.model.snapshot import (
    NOTES_MAX,
    UNITS_MAX,
    BlockSets,
    Rejection,
    Snapshot,
    SnapshotSummary,
)
from deltavault.model.volume import Partition
from deltavault.workers import DEFAULT_BUFFER_MEMORY

# Measured in bench/volume.py (docs/benchmarks.md, "Volume backup"): see there for why.
DEFAULT_BLOCK_SIZE = 1024 * 1024
CBT_MODES = ("auto", "fs", "qemu", "btrfs", "digests")
SOURCE_FORMATS = ("auto", "raw", "qcow2", "vhdx", "vmdk")


@dataclass
class VolumeOptions:
    block_size: int = DEFAULT_BLOCK_SIZE
    cbt: str = "auto"  # auto | fs | qemu | btrfs | digests
    verify_cbt: int = 0  # blocks to sample among those the source called unchanged
    free_space: str = "skip"  # skip: free blocks of a known file system are not read
    workers: int = 0
    # Block data read but not yet stored (--buffer-memory): bounds the segment pieces in flight.
    buffer_memory: int = DEFAULT_BUFFER_MEMORY
    snapshot_dir: str | None = None  # btrfs
    bitmap_granularity: int = 65536  # qemu
    source_format: str = "auto"  # auto (by the image's first bytes) | raw | qcow2 | vhdx | vmdk


@dataclass
class VolumeRequest:
    path: str
    logical: str | None = None
    source_id: str | None = None
    hostname: str = field(default_factory=socket.gethostname)
    tags: list[str] = field(default_factory=list)
    parent: str | None = None
    options: VolumeOptions = field(default_factory=VolumeOptions)


@dataclass
class VolumeReport:
    """The per-run report (printed, and written as JSON)."""

    source: str = ""
    source_format: str = ""  # raw | qcow2 | vhdx | vmdk: how the image was read
    size: int = 0
    block_size: int = 0
    file_system: str | None = None
    free_space: str = "skip"
    parent: str | None = None
    change_source: str = ""
    rejected: list[dict[str, str]] = field(default_factory=list)  # sources passed over, and why
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    blocks_total: int = 0
    blocks_changed: int = 0
    pages_changed: int = 0
    bytes_changed: int = 0  # pages_changed * 4 KiB
    bytes_dirty: int | None = None  # what the change source reported, where it reports bytes
    bytes_to_read: int = 0  # pages planned for reading
    bytes_read: int = 0  # everything read from the source, file-system metadata included
    bytes_extra_read: int = 0  # read to merge patch chains or rebase blocks
    bytes_free_skipped: int = 0
    bytes_zero_skipped: int = 0
    bytes_added: int = 0
    bytes_downloaded: int = 0
    segments_total: int = 0
    segments_written: int = 0
    verify_cbt: dict[str, Any] | None = None
    seconds: float = 0.0
    # Packs the index names that the repository's listing lacked or showed cut short at the
    # start, and the index entries dropped for them (repository/packcheck.py).
    packs_missing: int = 0
    packs_truncated: int = 0
    index_entries_dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VolumeResult:
    snapshot_id: str
    snapshot: Snapshot
    report: VolumeReport


def block_sets(size: int, block_size: int, read: BitMap, changed: BitMap,
               partitions: list[Partition]) -> BlockSets:
    """Block numbers read and changed, as units of at most UNITS_MAX per volume."""
    shift = 0
    while -(-size // (block_size << shift)) > UNITS_MAX:
        shift += 1

    def units(blocks: BitMap) -> bytes:
        if shift:  # coarser units: a unit is marked when any of its blocks is
            blocks = BitMap({b >> shift for b in blocks})
        blocks.run_optimize()
        return bytes(blocks.serialize())

    return BlockSets(unit=block_size << shift, read=units(read), changed=units(changed), partitions=partitions)


def snapshot_summary(rep: VolumeReport, *, blobs_added: int, raw_added: int, blocks_read: int,
                     blocks: BlockSets) -> SnapshotSummary:
    """What the snapshot keeps of the run's report: the numbers, and which change source
    answered after which were passed over, and why (docs/design.md, "Snapshots")."""
    return SnapshotSummary(bytes_processed=rep.bytes_read, bytes_total=rep.size, bytes_added=rep.bytes_added,
                           bytes_downloaded=rep.bytes_downloaded, blobs_added=blobs_added,
                           seconds=rep.seconds, change_source=rep.change_source,
                           rejected=[Rejection(source=r["source"], reason=r["reason"]) for r in rep.rejected],
                           notes=rep.notes[:NOTES_MAX], file_system=rep.file_system or "",
                           bytes_added_raw=raw_added, blocks_total=rep.blocks_total,
                           blocks_read=blocks_read, blocks_changed=rep.blocks_changed, blocks=blocks,
                           source_format=rep.source_format)


def default_source_id(hostname: str, logical: str) -> str:
    return f"{hostname}:volume:{logical}"


def validate(opts: VolumeOptions) -> None:
    try:
        check_block_size(opts.block_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if opts.cbt not in CBT_MODES:
        raise UsageError(f"--cbt must be one of {', '.join(CBT_MODES)}")
    if opts.free_space not in ("skip", "read"):
        raise UsageError("--free-space must be skip or read")
    if opts.source_format not in SOURCE_FORMATS:
        raise UsageError(f"--source-format must be one of {', '.join(SOURCE_FORMATS)}")
    if opts.verify_cbt < 0:
        raise UsageError("--verify-cbt needs a count of blocks, 0 or more")
