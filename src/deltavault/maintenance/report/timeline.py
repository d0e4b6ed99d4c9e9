"""The timeline: each source's runs, from the snapshots' summaries and the failed-run records."""

from __future__ import annotations

from deltavault.maintenance.report.data import Run, Source
from deltavault.model.snapshot import Snapshot
from deltavault.model.status import StatusRecord

# How people name the change sources (docs/design.md, "Change sources").
_LABELS = {"fs-digests": "{fs} digests", "qemu-bitmap": "qemu bitmap", "btrfs": "btrfs snapshots",
           "catalog": "catalog", "parent-trees": "parent's trees"}
_FS = {"ext4": "ext4", "ntfs": "NTFS"}
FIRST_RUN = "full read (first run)"


def change_label(snap: Snapshot) -> tuple[str, bool]:
    """(label, fallback): how this run knew what changed, and whether it had to read more
    than a change source would have had it read (passed one over, or read everything)."""
    s = snap.summary
    source = s.change_source if s else ""
    rejected = bool(s and s.rejected)
    if not source:
        return "not recorded", False
    if snap.parent is None:  # nothing to compare with: not a fallback
        return FIRST_RUN, False
    if source in ("block-digests", "none"):
        what = "full read (block digests)" if source == "block-digests" else "full read"
        return what, True
    fs = s.file_system if s else ""
    if fs == "partitions" and s is not None and s.blocks is not None:
        kinds = sorted({_FS.get(p.fs, p.fs) for p in s.blocks.partitions if p.fs})
        label = _LABELS.get(source, source).format(fs="/".join(kinds) or "file-system") + " per partition"
    else:
        label = _LABELS.get(source, source).format(fs=_FS.get(fs, "file-system"))
    return label, rejected


def run_of(sid: str, snap: Snapshot) -> Run:
    s = snap.summary
    label, fallback = change_label(snap)
    r = Run(snapshot=sid, time=snap.time, time_ns=snap.time_ns, status="ok", parent=snap.parent,
            change_label=label, fallback=fallback)
    if s is None:
        return r
    r.status = "partial" if s.errors else "ok"
    r.seconds, r.bytes_read, r.bytes_added = s.seconds, s.bytes_processed, s.bytes_added
    r.bytes_added_raw, r.bytes_total = s.bytes_added_raw, s.bytes_total
    r.files_new, r.files_changed, r.files_unmodified = s.files_new, s.files_changed, s.files_unmodified
    r.errors, r.incomplete = s.errors, s.incomplete[:20]
    r.change_source = s.change_source
    r.rejected = [{"source": x.source, "reason": x.reason} for x in s.rejected]
    reasons = {x.reason for x in s.rejected}
    r.notes = [n for n in s.notes if n not in reasons]  # a refusal's reason is often a note too
    r.blocks_total, r.blocks_read, r.blocks_changed = s.blocks_total, s.blocks_read, s.blocks_changed
    return r


def failed_run(rec: StatusRecord) -> Run:
    return Run(snapshot="", time=rec.time, time_ns=rec.time_ns, status="failed", seconds=rec.seconds,
               message=f"{rec.error}: {rec.message}" if rec.error else rec.message,
               change_label="failed")


def build_sources(chosen: list[tuple[str, Snapshot]], failures: list[StatusRecord]) -> list[Source]:
    """One Source per source id, runs oldest first. A failed run joins its source when the
    source has snapshots shown (a source with only failures shows as its own)."""
    by_id: dict[str, Source] = {}
    for sid, snap in chosen:
        src = by_id.get(snap.source_id)
        if src is None:
            src = by_id[snap.source_id] = Source(snap.source_id, snap.kind, snap.hostname, list(snap.paths))
        src.runs.append(run_of(sid, snap))
    for rec in failures:
        src = by_id.get(rec.source_id)
        if src is None:
            src = by_id[rec.source_id] = Source(rec.source_id, rec.snapshot_kind or "files", rec.hostname,
                                                list(rec.paths))
        src.runs.append(failed_run(rec))
    for src in by_id.values():
        src.runs.sort(key=lambda r: (r.time_ns, r.snapshot))
        saved = [r for r in src.runs if r.snapshot]
        for r in saved[1:]:  # no parent, yet not the first: forced, resized, or the parent is gone
            if r.change_label == FIRST_RUN:
                r.change_label, r.fallback = "full read (no parent)", True
    return sorted(by_id.values(), key=lambda s: (s.kind, s.id))
