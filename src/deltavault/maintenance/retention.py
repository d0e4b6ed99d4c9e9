"""Retention policies: which snapshots ``forget`` keeps, and why.

Snapshots are grouped (by host and paths by default) and each group is judged on its own,
newest first, like restic: ``last`` keeps the N newest; ``hourly``..``yearly`` keep the newest
snapshot of each of the N most recent periods that have one; ``within`` keeps everything
no older than the duration, counted back from the group's newest snapshot. A count of -1
means unlimited. A snapshot is kept when any rule keeps it; every rule that does is named.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo

from deltavault.errors import UsageError
from deltavault.model.snapshot import Snapshot

_DURATION = re.compile(r"(\d+)([ymwdh])")
_UNIT_DAYS = {"y": 365.2425, "m": 30.436875, "w": 7.0, "d": 1.0}


def parse_duration(text: str) -> timedelta:
    """'1y6m', '14d', '36h', '2w': y years, m months, w weeks, d days, h hours."""
    t = text.strip()
    if not t or _DURATION.sub("", t):
        raise UsageError(f"not a duration: {text!r} (examples: 7d, 36h, 2w, 1y6m)")
    total = timedelta()
    for num, unit in _DURATION.findall(t):
        if unit == "h":
            total += timedelta(hours=int(num))
        else:
            total += timedelta(days=int(num) * _UNIT_DAYS[unit])
    return total


@dataclass
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: timedelta | None = None
    tags: list[str] = field(default_factory=list)  # keep snapshots carrying any of these

    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly
                    or self.yearly or self.within is not None or self.tags)


@dataclass
class Decision:
    snapshot_id: str
    snapshot: Snapshot
    keep: bool
    reasons: list[str]


@dataclass
class Group:
    key: dict[str, object]
    decisions: list[Decision]  # newest first


def _bucketers(tz: tzinfo | None) -> list[tuple[str, Callable[[datetime], object]]]:
    def local(f: Callable[[datetime], object]) -> Callable[[datetime], object]:
        return lambda t: f(t.astimezone(tz))

    return [
        ("hourly", local(lambda t: (t.year, t.month, t.day, t.hour))),
        ("daily", local(lambda t: (t.year, t.month, t.day))),
        ("weekly", local(lambda t: t.isocalendar()[:2])),
        ("monthly", local(lambda t: (t.year, t.month))),
        ("yearly", local(lambda t: t.year)),
    ]


def _require_rule(policy: Policy) -> None:
    if policy.empty():
        raise UsageError("no retention rule given: that would forget every snapshot "
                         "(use --keep-last, --keep-daily, ... or name snapshots to forget)")


def snapshot_time(snap: Snapshot) -> datetime:
    return datetime.fromtimestamp(snap.time_ns / 1e9, UTC)


def apply_policy(snaps: Sequence[tuple[str, Snapshot]], policy: Policy, *,
                 tz: tzinfo | None = None) -> list[Decision]:
    """Decide one group. ``tz`` sets the calendar for periods (default: local time)."""
    _require_rule(policy)
    ordered = sorted(snaps, key=lambda s: (s[1].time_ns, s[0]), reverse=True)
    counts = {"last": policy.last, "hourly": policy.hourly, "daily": policy.daily,
              "weekly": policy.weekly, "monthly": policy.monthly, "yearly": policy.yearly}
    last_bucket: dict[str, object] = {}
    newest = snapshot_time(ordered[0][1]) if ordered else None
    out: list[Decision] = []
    bucketers = _bucketers(tz)
    for sid, snap in ordered:
        reasons: list[str] = []
        t = snapshot_time(snap)
        if counts["last"] != 0:
            reasons.append("last")
            counts["last"] -= 1
        for rule, bucket_of in bucketers:
            if counts[rule] == 0:
                continue
            b = bucket_of(t)
            if last_bucket.get(rule) != b:
                last_bucket[rule] = b
                reasons.append(f"{rule} ({_label(rule, t, tz)})")
                counts[rule] -= 1
        if policy.within is not None and newest is not None and newest - t <= policy.within:
            reasons.append("within")
        hit = sorted(set(policy.tags) & set(snap.tags))
        if hit:
            reasons.append("tag " + ",".join(hit))
        out.append(Decision(sid, snap, bool(reasons), reasons))
    return out


def _label(rule: str, t: datetime, tz: tzinfo | None) -> str:
    lt = t.astimezone(tz)
    fmt = {"hourly": "%Y-%m-%d %H:00", "daily": "%Y-%m-%d", "weekly": "%G-W%V",
           "monthly": "%Y-%m", "yearly": "%Y"}[rule]
    return lt.strftime(fmt)


def group_key(snap: Snapshot, by: Sequence[str]) -> tuple[tuple[str, object], ...]:
    parts: list[tuple[str, object]] = []
    for k in by:
        if k == "host":
            parts.append(("host", snap.hostname))
        elif k == "paths":
            parts.append(("paths", tuple(sorted(snap.paths))))
        elif k == "tags":
            parts.append(("tags", tuple(sorted(snap.tags))))
        elif k == "kind":
            parts.append(("kind", snap.kind))
        else:
            raise UsageError(f"cannot group by {k!r} (choose from host, paths, tags, kind)")
    return tuple(parts)


def plan_forget(snaps: Sequence[tuple[str, Snapshot]], policy: Policy, *,
                group_by: Sequence[str] = ("host", "paths"), tz: tzinfo | None = None) -> list[Group]:
    _require_rule(policy)
    groups: dict[tuple[tuple[str, object], ...], list[tuple[str, Snapshot]]] = {}
    for sid, snap in snaps:
        groups.setdefault(group_key(snap, group_by), []).append((sid, snap))
    out = []
    for key in sorted(groups, key=repr):
        out.append(Group({k: (list(v) if isinstance(v, tuple) else v) for k, v in key},
                         apply_policy(groups[key], policy, tz=tz)))
    return out
