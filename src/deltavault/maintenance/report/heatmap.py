"""Block-change heatmaps of volume snapshots, from the block sets their summaries record.

A volume becomes at most ``ReportOptions.regions`` regions of equal size (a whole number of
the coarsest unit any run recorded, so every unit falls in one region). A region's count is
how many of the runs shown changed any block in it. Runs with no parent (first runs, which
store everything) are not counted: they would colour the whole disk.
"""

from __future__ import annotations

import numpy as np
from pyroaring import BitMap

from deltavault.maintenance.report.data import Heatmap, Partition, VolumeRunBlocks
from deltavault.maintenance.report.timeline import change_label
from deltavault.model.snapshot import UNITS_MAX, BlockSets, Snapshot

COLUMNS = 64


def _region_runs(regions: np.ndarray) -> list[list[int]]:
    """[start, end) runs of sorted, distinct region numbers."""
    if not len(regions):
        return []
    breaks = np.flatnonzero(np.diff(regions) != 1)
    starts = np.concatenate(([regions[0]], regions[breaks + 1]))
    ends = np.concatenate((regions[breaks], [regions[-1]])) + 1
    return [[int(a), int(b)] for a, b in zip(starts, ends)]


def _units(bitmap: bytes) -> BitMap | None:
    """A stored block set, or None if no run writes it so: not a roaring bitmap (which ended
    the report with a traceback), or a unit past UNITS_MAX (one run container of four billion
    units is a few bytes stored and 16 GB as an array)."""
    try:
        units = BitMap.deserialize(bitmap) if bitmap else BitMap()
    except ValueError:
        return None
    return units if not units or units.max() < UNITS_MAX else None


def _recorded(b: BlockSets) -> bool:
    return _units(b.read) is not None and _units(b.changed) is not None


def _regions_of(bitmap: bytes, unit: int, region_bytes: int, regions: int) -> np.ndarray:
    units = np.asarray((_units(bitmap) or BitMap()).to_array(), dtype=np.int64)
    out = np.unique(units // (region_bytes // unit))
    return out[out < regions]


def build_heatmap(source: str, snaps: list[tuple[str, Snapshot]], *, max_regions: int,
                  runs_shown: int) -> Heatmap | None:
    """The heatmap of one volume source's snapshots (oldest first); None if none recorded
    block sets."""
    # Block sets a hostile writer made (see _units) count as not recorded.
    recorded = [(sid, s, s.summary.blocks) for sid, s in snaps
                if s.summary is not None and s.summary.blocks is not None and _recorded(s.summary.blocks)]
    if not recorded:
        return None
    newest = recorded[-1][1]
    size = newest.summary.bytes_total if newest.summary else 0
    # Runs of another size (before a resize) cannot share the grid: only the newest size's.
    recorded = [r for r in recorded if r[1].summary is not None and r[1].summary.bytes_total == size]
    unit = max(b.unit for _, _, b in recorded)
    units = max(1, -(-size // unit))
    region_bytes = unit * -(-units // max_regions)
    regions = max(1, -(-size // region_bytes))
    counts = np.zeros(regions, dtype=np.int64)
    counted: list[str] = []
    runs: list[VolumeRunBlocks] = []
    for i, (sid, snap, blocks) in enumerate(recorded):
        changed = _regions_of(blocks.changed, blocks.unit, region_bytes, regions)
        if snap.parent is not None:
            counts[changed] += 1
            counted.append(sid)
        if i >= len(recorded) - runs_shown:
            runs.append(_run_view(sid, snap, blocks, changed, region_bytes, regions))
    hm = Heatmap(source=source, size=size, region_bytes=region_bytes, regions=regions,
                 columns=min(COLUMNS, regions), counts=[int(c) for c in counts], runs_counted=counted,
                 runs_without_blocks=len(snaps) - len(recorded), runs=runs)
    blocks_now = recorded[-1][2]
    hm.partitions = [Partition(number=p.number, offset=p.offset, size=p.size, fs=p.fs,
                               first_region=p.offset // region_bytes,
                               last_region=min(regions - 1, max(p.offset, p.offset + p.size - 1) // region_bytes))
                     for p in blocks_now.partitions]
    return hm


def _run_view(sid: str, snap: Snapshot, blocks: BlockSets, changed: np.ndarray, region_bytes: int,
              regions: int) -> VolumeRunBlocks:
    s = snap.summary
    assert s is not None
    read = _regions_of(blocks.read, blocks.unit, region_bytes, regions)
    if snap.parent is None:  # every block is new; those read are the ones worth showing
        changed = np.intersect1d(changed, read)
    return VolumeRunBlocks(snapshot=sid, time=snap.time, change_label=change_label(snap)[0],
                           blocks_read=s.blocks_read, blocks_changed=s.blocks_changed,
                           blocks_total=s.blocks_total, read=_region_runs(read), changed=_region_runs(changed),
                           first=snap.parent is None)


def region_range(hm: Heatmap, region: int) -> tuple[int, int]:
    """The byte range [start, end) of a region."""
    start = region * hm.region_bytes
    return start, min(hm.size, start + hm.region_bytes)


def partition_of(hm: Heatmap, region: int) -> Partition | None:
    start, end = region_range(hm, region)
    for p in hm.partitions:
        if p.offset < end and start < p.offset + p.size:
            return p
    return None
