"""deltavault check: verify the repository."""

from __future__ import annotations

import argparse
import time

from deltavault.cli.common import Context, human
from deltavault.errors import ExitCode
from deltavault.maintenance.check import check_record, check_repository
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="verify the repository's structure (and data)")
    p.add_argument("--read-data", action="store_true", help="read and verify every blob")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo(use_cache=False, tolerant=True)
    start_ns = time.time_ns()
    with ctx.read_lock(repo, "check"):
        rep = check_repository(repo, read_data=a.read_data)
        # Reports show the last result. Only under a lock: --no-lock is for a repository
        # this user may only read.
        if any(not lk.released for lk in repo.held_locks):
            why = repo.save_status(check_record(rep, read_data=a.read_data, start_ns=start_ns))
            if why:
                ctx.warn(f"the check's result could not be recorded in the repository: {why}")
    for issue in rep.issues:
        ctx.emit({"type": "issue", "severity": issue.severity, "kind": issue.kind, "message": issue.message,
                  "snapshot": issue.snapshot, "path": issue.path},
                 f"{issue.severity}: {issue.message}")
    errors = rep.errors
    affected = {short_id(s): paths for s, paths in rep.affected.items()}
    text = (f"checked {rep.snapshots} snapshots, {rep.packs} packs"
            + (f", {rep.blobs_checked} blobs ({human(rep.bytes_read)} read)" if a.read_data else "")
            + (": no errors found" if not errors else f": {len(errors)} error(s)"))
    if affected:
        text += "\naffected snapshots and paths:\n" + "\n".join(
            f"  {s}: {', '.join(sorted(set(p))[:20])}" + (" ..." if len(set(p)) > 20 else "")
            for s, p in sorted(affected.items()))
    ctx.emit({"type": "check_summary", "snapshots": rep.snapshots, "packs": rep.packs,
              "blobs_checked": rep.blobs_checked, "errors": len(errors),
              "damaged_blobs": len(rep.damaged_blobs), "affected": rep.affected}, text)
    return int(ExitCode.CORRUPT) if errors else 0
