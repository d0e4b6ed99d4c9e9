"""Gathering a report: snapshots, status records, trees and the index; never pack data."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from deltavault.maintenance.report.data import Report, WhereBytes
from deltavault.maintenance.report.health import build_health
from deltavault.maintenance.report.heatmap import build_heatmap
from deltavault.maintenance.report.select import ReportOptions, select, source_matches
from deltavault.maintenance.report.timeline import build_sources
from deltavault.maintenance.report.where import where_bytes
from deltavault.model.snapshot import Snapshot
from deltavault.model.status import CHECK, FAILED, StatusRecord
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id

WHERE_SOURCES = 8  # "where the bytes went" walks trees: for this many file sources at most


def _failures(repo: Repository, opts: ReportOptions, since_ns: int | None) -> list[StatusRecord]:
    """Failed runs to show: none when snapshots are named, else those of the sources asked for."""
    if opts.snapshots:
        return []
    recs = repo.status_records(FAILED, since_ns=since_ns or 0)
    if opts.sources:
        recs = [r for r in recs if any(source_matches(r.source_id, r.paths, w) for w in opts.sources)]
    return recs


def _where(repo: Repository, source: str, chosen: list[tuple[str, Snapshot]],
           by_id: dict[str, Snapshot]) -> WhereBytes | None:
    """The newest shown snapshot of ``source`` against the one shown before it, else its parent."""
    mine = [(sid, s) for sid, s in chosen if s.source_id == source and s.tree is not None]
    if not mine:
        return None
    sid, snap = mine[-1]
    assert snap.tree is not None
    older: tuple[str, bytes] | None = None
    if len(mine) > 1 and mine[-2][1].tree is not None:
        older = (mine[-2][0], mine[-2][1].tree)
    elif snap.parent is not None:
        parent = by_id.get(snap.parent)
        if parent is not None and parent.tree is not None:
            older = (snap.parent, parent.tree)
    return where_bytes(repo, source, older, (sid, snap.tree))


def build_report(repo: Repository, opts: ReportOptions) -> Report:
    all_snaps = repo.list_snapshots()
    chosen, since_ns = select(all_snaps, opts)
    sources = build_sources(chosen, _failures(repo, opts, since_ns))
    now = opts.now_ns or time.time_ns()
    rep = Report(generated=datetime.fromtimestamp(now / 1e9, UTC).isoformat().replace("+00:00", "Z"),
                 repository=repo.config.id, location=repo.backend.location(), snapshots=len(chosen),
                 snapshots_total=len(all_snaps),
                 since=datetime.fromtimestamp(since_ns / 1e9, UTC).isoformat().replace("+00:00", "Z")
                 if since_ns is not None else None, sources=sources)
    by_id = dict(all_snaps)
    for src in sources:
        if src.kind == "volume":
            hm = build_heatmap(src.id, [(s, x) for s, x in chosen if x.source_id == src.id],
                               max_regions=opts.regions, runs_shown=opts.runs_shown)
            if hm is not None:
                rep.heatmaps.append(hm)
        elif len(rep.where) < WHERE_SOURCES:
            wb = _where(repo, src.id, chosen, by_id)
            if wb is not None:
                rep.where.append(wb)
    checks = repo.status_records(CHECK, newest=1)
    rep.health = build_health(repo, all_snaps, checks[-1] if checks else None, opts.policy, opts.group_by,
                              sources)
    old = sum(1 for _, s in chosen if s.summary is None or not s.summary.change_source)
    if old:
        rep.warnings.append(f"{old} snapshot(s) were written by an older deltavault that did not record "
                            "change sources, raw bytes or block sets: they show what they have")
    for sid, why in sorted(repo.damaged_snapshots.items()):
        rep.warnings.append(f"snapshot {short_id(sid)} cannot be read and is left out ({why})")
    for name, why in sorted(repo.status.damaged.items()):
        rep.warnings.append(f"{name} cannot be read and is left out ({why})")
    return rep
