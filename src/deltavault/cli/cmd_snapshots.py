"""deltavault snapshots: list snapshots."""

from __future__ import annotations

import argparse

import msgspec

from deltavault.cli.common import Context, human, when
from deltavault.cli.snapshot_filters import add_filters, filtered
from deltavault.errors import UsageError
from deltavault.fs.paths import shown
from deltavault.model.snapshot import Snapshot, SnapshotSummary
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snapshots", help="list snapshots")
    p.add_argument("snapshots", nargs="*", help="only these snapshots (ids, prefixes, latest)")
    add_filters(p)
    p.add_argument("--latest", type=int, metavar="N",
                   help="only the N newest snapshots of each host and set of paths")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    if a.latest is not None and a.latest < 1:
        raise UsageError("--latest takes a number of snapshots, 1 or more")
    repo = ctx.open_repo()
    rows = filtered(repo, a, a.snapshots)
    if a.latest is not None:
        rows = _latest(rows, a.latest)
    if ctx.json:
        for sid, s in rows:
            ctx.result({"type": "snapshot", "id": sid, "time": s.time, "hostname": s.hostname, "kind": s.kind,
                        "paths": s.paths, "tags": s.tags, "parent": s.parent, "original": s.original,
                        "summary": _summary(s.summary)})
        return 0
    lines = [f"{'ID':<10}{'time (UTC)':<22}{'host':<14}{'kind':<8}{'size':>11}  paths"]
    for sid, s in rows:
        size = human(s.summary.bytes_total) if s.summary else "?"
        lines.append(f"{short_id(sid):<10}{when(s):<22}{shown(s.hostname)[:13]:<14}{shown(s.kind):<8}"
                     f"{size:>11}  {', '.join(map(shown, s.paths))}" + (f"  [{', '.join(map(shown, s.tags))}]" if s.tags else "")
                     + (f"  (incomplete: {s.summary.errors} unreadable)" if s.summary and s.summary.errors else ""))
    lines.append(f"{len(rows)} snapshot(s)")
    ctx.result(None, "\n".join(lines))
    return 0


def _latest(rows: list[tuple[str, Snapshot]], n: int) -> list[tuple[str, Snapshot]]:
    """The ``n`` newest of each (host, paths) group, in time order."""
    keep: set[str] = set()
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for sid, s in rows:
        groups.setdefault((s.hostname, tuple(sorted(s.paths))), []).append(sid)
    for ids in groups.values():
        keep.update(ids[-n:])
    return [r for r in rows if r[0] in keep]


def _summary(s: SnapshotSummary | None) -> dict[str, object] | None:
    return None if s is None else msgspec.structs.asdict(s)
