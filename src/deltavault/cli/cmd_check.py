"""deltavault check: verify the repository."""

from __future__ import annotations

import argparse
import time

from deltavault.backends import retention
from deltavault.cli.common import Context, human, parse_size
from deltavault.errors import ExitCode
from deltavault.fs.paths import one_line
from deltavault.maintenance.check import DataSubset, check_record, check_repository
from deltavault.maintenance.findings import CheckIssue, CheckReport
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="verify the repository's structure (and data)")
    p.add_argument("--read-data", action="store_true", help="read and verify every blob")
    p.add_argument("--read-data-subset", type=_subset, metavar="N/M|P%|SIZE",
                   help="read and verify only some packs: slice N of M (1/5 to 5/5 read each pack once), "
                        "a random P%% of them, or random packs up to SIZE (e.g. 10G)")
    p.add_argument("--read-headers", action="store_true",
                   help="also read each pack's header (a small read at its end) and compare it with the index")
    p.set_defaults(func=run)


def _subset(text: str) -> DataSubset:
    t = text.strip()
    try:
        if "/" in t:
            n, m = (int(x) for x in t.split("/", 1))
            if not 1 <= n <= m:
                raise ValueError
            return DataSubset("slice", n=n, m=m, text=t)
        if t.endswith("%"):
            share = float(t[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError
            return DataSubset("share", share=share, text=t)
        size = parse_size(t)
        if size <= 0:
            raise ValueError
        return DataSubset("size", size=size, text=t)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a subset: give N/M (1 <= N <= M), a percentage such as 10% or 2.5%, "
            "or a size such as 50G") from None


def run(ctx: Context) -> int:
    a = ctx.args
    if a.read_data and a.read_data_subset:
        ctx.warn(f"--read-data-subset {a.read_data_subset.text} reads only its packs; --read-data is ignored")
    full = a.read_data and a.read_data_subset is None
    repo = ctx.open_repo(use_cache=False, tolerant=True)
    start_ns = time.time_ns()
    with ctx.read_lock(repo, "check"):
        rep = check_repository(repo, read_data=a.read_data, subset=a.read_data_subset, headers=a.read_headers)
        if repo.config.retention:
            _check_retention(repo, rep)
        # Reports show the last result. Only under a lock: --no-lock is for a repository
        # this user may only read.
        if any(not lk.released for lk in repo.held_locks):
            why = repo.save_status(check_record(rep, read_data=full, subset=a.read_data_subset, start_ns=start_ns))
            if why:
                ctx.warn(f"the check's result could not be recorded in the repository: {why}")
    for issue in rep.issues:
        ctx.emit({"type": "issue", "severity": issue.severity, "kind": issue.kind, "message": issue.message,
                  "snapshot": issue.snapshot, "path": issue.path},
                 f"{issue.severity}: {one_line(issue.message)}")  # a stored name cannot forge an issue
    errors = rep.errors
    affected = {short_id(s): paths for s, paths in rep.affected.items()}
    text = (f"checked {rep.snapshots} snapshots, {rep.packs} packs"
            + (f", {rep.blobs_checked} blobs in {rep.packs_read} pack(s)"
               + (f" of subset {a.read_data_subset.text}" if a.read_data_subset else "")
               + f" ({human(rep.bytes_read)} read)" if a.read_data or a.read_data_subset else "")
            + (_headers_text(rep) if a.read_headers else "")
            + (": no errors found" if not errors else f": {len(errors)} error(s)"))
    if affected:
        text += "\naffected snapshots and paths:\n" + "\n".join(
            f"  {s}: {', '.join(sorted(set(p))[:20])}" + (" ..." if len(set(p)) > 20 else "")
            for s, p in sorted(affected.items()))
    ctx.emit({"type": "check_summary", "snapshots": rep.snapshots, "packs": rep.packs,
              "blobs_checked": rep.blobs_checked, "packs_read": rep.packs_read, "bytes_read": rep.bytes_read,
              "headers_read": rep.headers_read, "headers_checked": rep.headers_checked,
              "read_data": full, "read_data_subset": a.read_data_subset.text if a.read_data_subset else None,
              "errors": len(errors),
              "damaged_blobs": len(rep.damaged_blobs), "affected": rep.affected}, text)
    return int(ExitCode.CORRUPT) if errors else 0


def _headers_text(rep: CheckReport) -> str:
    """What --read-headers did: the data pass compares the header of each pack it reads, so
    only the others are read alone (none after a full --read-data)."""
    with_data = rep.headers_checked - rep.headers_read
    if not with_data:
        return f", {rep.headers_read} pack header(s) read"
    alone = f", {rep.headers_read} read alone" if rep.headers_read else ""
    return f", {rep.headers_checked} pack header(s) checked ({with_data} with their data{alone})"


def _check_retention(repo: Repository, rep: CheckReport) -> None:
    """An immutable repository: every object but locks must still carry the retention its
    config asks for. One that lacks it, or whose retention was shortened (governance
    bypass), is an error: it could be deleted before its time."""
    r = retention.Retention.parse(repo.config.retention)
    names = ["config"] + [o.name for folder in ("keys/", "snapshots/", "index/", "data/")
                          for o in repo.backend.list(folder)]
    for name, problem in retention.audit(repo.backend, r, names):
        rep.add(CheckIssue("retention", f"{name} {problem}"))
