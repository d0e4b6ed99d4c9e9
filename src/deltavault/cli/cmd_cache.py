"""deltavault cache: list the local caches, and remove old ones."""

from __future__ import annotations

import argparse
import time

from deltavault.cli.common import Context, human
from deltavault.errors import UsageError
from deltavault.maintenance.caches import list_caches, old_caches, remove_cache
from deltavault.repository.cache import default_cache_root


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list the local caches (one per repository); remove old ones")
    p.add_argument("--cleanup", action="store_true", help="remove caches not used for --max-age days")
    p.add_argument("--max-age", type=float, default=30, metavar="DAYS",
                   help="with --cleanup: how long unused (default %(default)s days)")
    p.add_argument("--remove", action="append", default=[], metavar="ID",
                   help="remove the cache of this repository id (or unique prefix; repeatable)")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    root = ctx.cache_root() or default_cache_root()
    caches = list_caches(root)
    doomed = old_caches(caches, a.max_age) if a.cleanup else []
    for ref in a.remove:
        hits = [c for c in caches if c.id.startswith(ref)]
        if len(hits) != 1:
            raise UsageError(f"no cache matches {ref!r}" if not hits else f"cache prefix {ref!r} is ambiguous")
        doomed.append(hits[0])
    for c in {c.id: c for c in doomed}.values():
        remove_cache(root, c.id)
    gone = {c.id for c in doomed}
    for c in caches:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.last_used))
        ctx.result({"type": "cache", "id": c.id, "path": str(c.path), "size": c.size, "last_used": c.last_used,
                    "removed": c.id in gone},
                   f"{c.id[:8]}  {human(c.size):>10}  last used {when}" + ("  removed" if c.id in gone else ""))
    ctx.result({"type": "cache_summary", "caches": len(caches), "removed": len(gone),
                "bytes": sum(c.size for c in caches if c.id not in gone), "root": str(root)},
               f"{len(caches)} cache(s) in {root}" + (f"; removed {len(gone)}" if gone else "")
               + ("" if a.cleanup or gone else "; 'deltavault cache --cleanup' removes those unused for 30 days"))
    return 0
