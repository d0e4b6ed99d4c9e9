"""deltavault unlock: remove stale locks (--remove-all: every lock)."""

from __future__ import annotations

import argparse
import time

from deltavault.cli.common import Context
from deltavault.fs.paths import shown
from deltavault.maintenance.unlock import unlock


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("unlock", help="remove locks left by processes that are gone")
    p.add_argument("--remove-all", action="store_true",
                   help="remove every lock, live ones too (only when you know their holders are gone)")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo(use_cache=False)
    reports = unlock(repo, remove_all=a.remove_all)
    for r in reports:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.info.created))
        what = f"pid {r.info.pid} on {shown(r.info.hostname)} ({shown(r.info.command) or 'unknown command'}) since {since}"
        ctx.emit({"type": "lock", "id": r.name.removeprefix("locks/"), "hostname": r.info.hostname,
                  "pid": r.info.pid, "command": r.info.command, "exclusive": r.info.exclusive,
                  "stale": r.stale, "removed": r.removed},
                 f"{'removed' if r.removed else 'kept'} {'stale' if r.stale else 'live'} lock of {what}")
    removed = sum(r.removed for r in reports)
    ctx.emit({"type": "unlock_summary", "removed": removed, "kept": len(reports) - removed},
             f"removed {removed} lock(s)" + (f"; {len(reports) - removed} live one(s) kept (--remove-all removes "
                                             "them too)" if len(reports) > removed else ""))
    return 0
