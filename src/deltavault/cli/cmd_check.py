"""deltavault check: verify the repository."""

from __future__ import annotations

import argparse

from deltavault.backends import retention
from deltavault.cli.common import Context, human
from deltavault.errors import ExitCode
from deltavault.maintenance.check import check_repository
from deltavault.maintenance.findings import CheckIssue, CheckReport
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="verify the repository's structure (and data)")
    p.add_argument("--read-data", action="store_true", help="read and verify every blob")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo(use_cache=False, tolerant=True)
    with ctx.read_lock(repo, "check"):
        rep = check_repository(repo, read_data=a.read_data)
        if repo.config.retention:
            _check_retention(repo, rep)
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


def _check_retention(repo: Repository, rep: CheckReport) -> None:
    """An immutable repository: every object but locks must still carry the retention its
    config asks for. One that lacks it, or whose retention was shortened (governance
    bypass), is an error: it could be deleted before its time."""
    r = retention.Retention.parse(repo.config.retention)
    names = ["config"] + [o.name for folder in ("keys/", "snapshots/", "index/", "data/")
                          for o in repo.backend.list(folder)]
    for name, problem in retention.audit(repo.backend, r, names):
        rep.add(CheckIssue("retention", f"{name} {problem}"))
