"""deltavault snapshots: list snapshots."""

from __future__ import annotations

import argparse

import msgspec

from deltavault.cli.common import Context, human
from deltavault.model.snapshot import SnapshotSummary
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snapshots", help="list snapshots")
    p.add_argument("--host", help="only this host")
    p.add_argument("--tag", help="only snapshots with this tag")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo()
    snaps = repo.list_snapshots()
    rows = []
    for sid, s in snaps:
        if a.host and s.hostname != a.host:
            continue
        if a.tag and a.tag not in s.tags:
            continue
        rows.append((sid, s))
    if ctx.json:
        for sid, s in rows:
            ctx.emit({"type": "snapshot", "id": sid, "time": s.time, "hostname": s.hostname, "kind": s.kind,
                      "paths": s.paths, "tags": s.tags, "parent": s.parent,
                      "summary": _summary(s.summary)})
        return 0
    ctx.say(f"{'ID':<10}{'time (UTC)':<22}{'host':<14}{'kind':<8}{'size':>11}  paths")
    for sid, s in rows:
        size = human(s.summary.bytes_total) if s.summary else "?"
        ctx.say(f"{short_id(sid):<10}{s.time[:19].replace('T', ' '):<22}{s.hostname[:13]:<14}{s.kind:<8}"
                f"{size:>11}  {', '.join(s.paths)}" + (f"  [{', '.join(s.tags)}]" if s.tags else "")
                + (f"  (incomplete: {s.summary.errors} unreadable)" if s.summary and s.summary.errors else ""))
    ctx.say(f"{len(rows)} snapshot(s)")
    return 0


def _summary(s: SnapshotSummary | None) -> dict[str, object] | None:
    return None if s is None else msgspec.structs.asdict(s)
