"""Which snapshots a report shows: named ones, those of some sources, those since a date."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from deltavault.errors import UsageError
from deltavault.maintenance.retention import Policy, parse_duration
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import match_prefix

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?")


@dataclass
class ReportOptions:
    snapshots: list[str] = field(default_factory=list)  # ids, prefixes or "latest"
    sources: list[str] = field(default_factory=list)  # source ids, or paths they back up
    since: str | None = None  # a date (local time unless it says otherwise) or a duration (7d)
    policy: Policy | None = None  # retention to show: which snapshots it keeps or forgets
    group_by: list[str] = field(default_factory=lambda: ["host", "paths"])
    regions: int = 1024  # the most regions a volume heatmap has
    runs_shown: int = 24  # the most runs of a volume the per-run view shows
    now_ns: int | None = None  # "now" for durations (tests)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """'2024-05-01', '2024-05-01T12:00', '2024-05-01T12:00Z', or a duration back from now: '7d'."""
    t = text.strip()
    if _DATE.fullmatch(t):
        when = datetime.fromisoformat(t.replace(" ", "T"))
        return when if when.tzinfo is not None else when.astimezone()  # naive: local time
    try:
        span = parse_duration(t)
    except UsageError:
        raise UsageError(f"--since: not a date or a duration: {text!r} "
                         "(examples: 2024-05-01, 2024-05-01T12:00, 7d, 12h)") from None
    return (now or datetime.now(UTC)) - span


def source_matches(source_id: str, paths: list[str], wanted: str) -> bool:
    """Whether --source ``wanted`` names this source: its id, or a path it backs up."""
    if source_id == wanted:
        return True
    return os.path.isabs(wanted) and os.path.normpath(wanted) in paths


def select(snaps: list[tuple[str, Snapshot]], opts: ReportOptions) -> tuple[list[tuple[str, Snapshot]], int | None]:
    """The snapshots to show, oldest first, and the --since bound in ns (None without it).
    Raises UsageError, with what there is instead, when nothing is left."""
    if not snaps:
        raise UsageError("the repository has no snapshots yet: nothing to report")
    chosen = snaps
    if opts.snapshots:
        by_id = dict(snaps)
        want: list[str] = []
        for ref in opts.snapshots:
            if ref == "latest":
                want.append(snaps[-1][0])
            else:
                want.append(match_prefix(by_id, ref.lower(), "snapshot"))
        keep = set(want)
        chosen = [s for s in snaps if s[0] in keep]
    if opts.sources:
        for wanted in opts.sources:
            if not any(source_matches(s.source_id, s.paths, wanted) for _, s in snaps):
                known = sorted({s.source_id for _, s in snaps})
                raise UsageError(f"--source {wanted!r}: no snapshot has that source id or path; the "
                                 f"repository's sources are: {', '.join(known[:10])}"
                                 + (" ..." if len(known) > 10 else ""))
        chosen = [s for s in chosen if any(source_matches(s[1].source_id, s[1].paths, w) for w in opts.sources)]
    since_ns = None
    if opts.since is not None:
        now = datetime.fromtimestamp(opts.now_ns / 1e9, UTC) if opts.now_ns else None
        since_ns = int(parse_since(opts.since, now).timestamp() * 1e9)
        chosen = [s for s in chosen if s[1].time_ns >= since_ns]
        if not chosen:
            raise UsageError(f"no snapshot matches since {opts.since} (the newest is from {snaps[-1][1].time})")
    if not chosen:
        raise UsageError("no snapshot matches the selection")
    return chosen, since_ns
