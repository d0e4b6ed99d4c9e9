"""deltavault forget: remove snapshots by a retention policy (or by id). Data stays until prune."""

from __future__ import annotations

import argparse

from deltavault.cli.common import Context
from deltavault.errors import UsageError
from deltavault.maintenance.retention import Policy, parse_duration, plan_forget
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forget", help="remove snapshots by a retention policy (prune frees the data)")
    p.add_argument("snapshots", nargs="*", help="snapshot ids (or prefixes) to forget explicitly")
    add_policy_options(p)
    p.add_argument("--host", help="consider only this host's snapshots")
    p.add_argument("-n", "--dry-run", action="store_true", help="show what would be forgotten; change nothing")
    p.set_defaults(func=run)


def add_policy_options(p: argparse.ArgumentParser) -> None:
    """--keep-* and --group-by (forget, and report's retention view)."""
    for rule, what in (("last", "the N newest"), ("hourly", "the newest of each of N hours"),
                       ("daily", "the newest of each of N days"), ("weekly", "the newest of each of N weeks"),
                       ("monthly", "the newest of each of N months"), ("yearly", "the newest of each of N years")):
        p.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N", help=f"keep {what} (-1: unlimited)")
    p.add_argument("--keep-within", metavar="DURATION",
                   help="keep every snapshot within DURATION of the group's newest (e.g. 14d, 1y6m, 36h)")
    p.add_argument("--keep-tag", action="append", default=[], metavar="TAG", help="keep snapshots with TAG")
    p.add_argument("--group-by", default="host,paths",
                   help="comma-separated: host, paths, tags, kind (default %(default)s)")


def policy_of(a: argparse.Namespace) -> Policy:
    return Policy(last=a.keep_last, hourly=a.keep_hourly, daily=a.keep_daily, weekly=a.keep_weekly,
                  monthly=a.keep_monthly, yearly=a.keep_yearly,
                  within=parse_duration(a.keep_within) if a.keep_within else None, tags=a.keep_tag)


def group_by_of(a: argparse.Namespace) -> list[str]:
    return [g.strip() for g in a.group_by.split(",") if g.strip()]


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo()
    # Removing snapshots only drops references, so a shared lock suffices: a prune planning
    # at the same time just keeps more than it had to.
    with repo.lock(command="forget", wait=a.lock_wait):
        snaps = repo.list_snapshots()
        if a.host:
            snaps = [s for s in snaps if s[1].hostname == a.host]
        if a.snapshots:
            return _forget_ids(ctx, repo, a.snapshots, a.dry_run)
        groups = plan_forget(snaps, policy_of(a), group_by=group_by_of(a))
        removed = kept = 0
        for g in groups:
            label = ", ".join(f"{k} {','.join(v) if isinstance(v, list) else v}" for k, v in g.key.items())
            ctx.say(f"group: {label}")
            for d in g.decisions:
                action = "keep" if d.keep else "remove"
                ctx.emit({"type": "forget", "group": g.key, "snapshot": d.snapshot_id, "time": d.snapshot.time,
                          "action": action, "reasons": d.reasons, "dry_run": a.dry_run},
                         f"  {action:<7}{short_id(d.snapshot_id)}  {d.snapshot.time[:19].replace('T', ' ')}  "
                         + ("; ".join(d.reasons) if d.reasons else "no rule keeps it"))
                if d.keep:
                    kept += 1
                else:
                    removed += 1
                    if not a.dry_run:
                        repo.delete_snapshot(d.snapshot_id)
    ctx.emit({"type": "forget_summary", "kept": kept, "removed": removed, "dry_run": a.dry_run},
             f"{'would remove' if a.dry_run else 'removed'} {removed} snapshot(s), kept {kept}"
             + ("; run 'deltavault prune' to free their data" if removed and not a.dry_run else ""))
    return 0


def _forget_ids(ctx: Context, repo: Repository, refs: list[str], dry_run: bool) -> int:
    ids = []
    for ref in refs:
        if ref == "latest":
            raise UsageError("name snapshots by id to forget them, not 'latest'")
        ids.append(repo.resolve_snapshot(ref)[0])
    for sid in dict.fromkeys(ids):
        ctx.emit({"type": "forget", "snapshot": sid, "action": "remove", "reasons": ["named"], "dry_run": dry_run},
                 f"  remove {short_id(sid)}  (named)")
        if not dry_run:
            repo.delete_snapshot(sid)
    ctx.emit({"type": "forget_summary", "kept": 0, "removed": len(set(ids)), "dry_run": dry_run},
             f"{'would remove' if dry_run else 'removed'} {len(set(ids))} snapshot(s)")
    return 0
