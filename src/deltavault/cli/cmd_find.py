"""deltavault find: which snapshots hold a path or pattern, with its size and time."""

from __future__ import annotations

import argparse
import time

from deltavault.cli.common import Context, human, when
from deltavault.cli.snapshot_filters import add_filters, filtered
from deltavault.fs.paths import display, exact, shown
from deltavault.fs.patterns import PatternSet
from deltavault.fs.sources import SnapshotMatcher
from deltavault.maintenance.find import Finder
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("find", help="find files in snapshots by path or pattern")
    p.add_argument("patterns", nargs="+", metavar="PATTERN",
                   help="a path or pattern ('*.conf', 'etc/fstab', '/srv/data/**/report*')")
    p.add_argument("-s", "--snapshot", action="append", default=[], metavar="ID",
                   help="look only in this snapshot (repeatable; default: all)")
    p.add_argument("-i", "--ignore-case", action="store_true", help="match ignoring case")
    add_filters(p)
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    pats = PatternSet([] if a.ignore_case else a.patterns, ignore_case=a.patterns if a.ignore_case else [])
    repo = ctx.open_repo()
    snaps = [(sid, s) for sid, s in filtered(repo, a, a.snapshot) if s.tree is not None]
    finder = Finder(repo)
    total = in_snaps = 0
    for sid, snap in snaps:
        hits = finder.find(snap, SnapshotMatcher(pats, snap.paths))
        if not hits:
            continue
        in_snaps += 1
        total += len(hits)
        lines = [f"snapshot {short_id(sid)} of {shown(snap.hostname)}, {when(snap)}:"]
        for path, n in hits:
            t = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(n.mtime / 1e9))
            ctx.result({"type": "match", "snapshot": sid, "time": snap.time, "hostname": snap.hostname,
                        "path": exact(path), "path_hex": path.hex(), "node_type": n.type.value, "size": n.size, "mtime_ns": n.mtime,
                        "mode": n.mode})
            lines.append(f"  {n.type.value} {human(n.size):>10}  {t}  {display(path)}")
        ctx.result(None, "\n".join(lines))
    what = ", ".join(repr(p) for p in a.patterns)
    text = (f"{total} match(es) in {in_snaps} of {len(snaps)} snapshot(s)" if total else
            f"nothing matches {what} in {len(snaps)} snapshot(s)")
    ctx.result({"type": "find_summary", "matches": total, "snapshots_matching": in_snaps,
                "snapshots_searched": len(snaps)}, text)
    return 0
