"""Repository health: deduplication and compression over time, the last check, retention.

Over time, from the snapshots' summaries (every snapshot of the repository, oldest first):
after each snapshot, *logical* is the sum of the snapshots' sizes so far, *raw* the
plaintext bytes of the blobs their runs added, *stored* what those runs wrote. Then
deduplication is logical / raw, compression raw / stored, and both together logical /
stored. Snapshots written before runs recorded their raw bytes (those with no recorded
change source) are left out of the first two (counted in ``points_without_raw``). Now, from the index: raw bytes of every blob over
the packs' size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Protocol

import msgspec

from deltavault.maintenance.report.data import Health, HealthPoint, Source
from deltavault.maintenance.retention import Policy, plan_forget
from deltavault.model.snapshot import Snapshot
from deltavault.model.status import StatusRecord
from deltavault.repository.index import Index


class IndexRepo(Protocol):
    @property
    def index(self) -> Index: ...

    def list_pack_names(self) -> dict[bytes, int]: ...


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if a and b else None


def series(snaps: Sequence[tuple[str, Snapshot]]) -> tuple[list[HealthPoint], int]:
    out: list[HealthPoint] = []
    logical = stored = logical_r = stored_r = raw = 0
    missing = 0
    for sid, snap in snaps:
        s = snap.summary
        if s is None:
            missing += 1
            continue
        logical += s.bytes_total
        stored += s.bytes_added
        if s.change_source:  # written by a run that records its raw bytes
            logical_r += s.bytes_total
            stored_r += s.bytes_added
            raw += s.bytes_added_raw
        else:
            missing += 1
        out.append(HealthPoint(snapshot=sid, time=snap.time, time_ns=snap.time_ns, bytes_total=s.bytes_total,
                               bytes_added=s.bytes_added, dedup=_ratio(logical_r, raw),
                               compression=_ratio(raw, stored_r), saving=_ratio(logical, stored)))
    return out, missing


def build_health(repo: IndexRepo, snaps: Sequence[tuple[str, Snapshot]], last_check: StatusRecord | None,
                 policy: Policy | None, group_by: Sequence[str], sources: list[Source]) -> Health:
    packs = repo.list_pack_names()
    raw_bytes = blobs = 0
    for _bid, _pack, entry, _pos in repo.index.iter_records():
        raw_bytes += entry.raw_length
        blobs += 1
    pack_bytes = sum(packs.values())
    logical = sum(s.summary.bytes_total for _, s in snaps if s.summary)
    points, missing = series(snaps)
    h = Health(packs=len(packs), pack_bytes=pack_bytes, blobs=blobs, blobs_raw_bytes=raw_bytes,
               compression_now=_ratio(raw_bytes, pack_bytes), dedup_now=_ratio(logical, raw_bytes),
               series=points, points_without_raw=missing,
               last_check=msgspec.structs.asdict(last_check) if last_check is not None else None)
    if policy is not None:
        _retention(h, snaps, policy, group_by, sources)
    return h


def _retention(h: Health, snaps: Sequence[tuple[str, Snapshot]], policy: Policy, group_by: Sequence[str],
               sources: list[Source]) -> None:
    """Judge every snapshot, as forget would; mark the runs shown."""
    decisions = {d.snapshot_id: d for g in plan_forget(snaps, policy, group_by=group_by) for d in g.decisions}
    pol: dict[str, Any] = asdict(policy)
    pol["within"] = str(policy.within) if policy.within is not None else None
    pol["group_by"] = list(group_by)
    h.retention_policy = pol
    for src in sources:
        for run in src.runs:
            d = decisions.get(run.snapshot)
            if d is None:
                continue
            run.retention = "keep" if d.keep else "forget"
            run.retention_reasons = list(d.reasons)
    h.retention_keep = sum(1 for d in decisions.values() if d.keep)
    h.retention_forget = len(decisions) - h.retention_keep
