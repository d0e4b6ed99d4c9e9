"""deltavault forget: remove snapshots by a retention policy (or by id). Data stays until prune."""

from __future__ import annotations

import argparse

from deltavault.backends.s3errors import ObjectRetained
from deltavault.cli.common import Context, when
from deltavault.cli.snapshot_filters import add_filters, filtered
from deltavault.errors import UsageError
from deltavault.fs.paths import shown
from deltavault.maintenance.retention import Policy, parse_duration, plan_forget
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forget", help="remove snapshots by a retention policy (prune frees the data)")
    p.add_argument("snapshots", nargs="*", help="snapshot ids (or prefixes) to forget explicitly")
    add_policy_options(p)
    add_filters(p, "consider snapshots")
    p.add_argument("-n", "--dry-run", action="store_true", help="show what would be forgotten; change nothing")
    p.add_argument("--prune", action="store_true",
                   help="then run prune, so the data only forgotten snapshots used is freed")
    p.set_defaults(func=run)


def add_policy_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
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
        if a.snapshots:
            _forget_ids(ctx, repo, a.snapshots, a.dry_run)
        else:
            _forget_by_policy(ctx, repo)
    return _then_prune(ctx)  # once forget's lock is let go: prune takes its own


def _forget_by_policy(ctx: Context, repo: Repository) -> None:
    a = ctx.args
    snaps = filtered(repo, a)
    groups = plan_forget(snaps, policy_of(a), group_by=group_by_of(a))
    removed = kept = 0
    for g in groups:
        label = shown(", ".join(f"{k} {','.join(v) if isinstance(v, list) else v}" for k, v in g.key.items()))
        ctx.say(f"group: {label}")
        for d in g.decisions:
            action = "keep" if d.keep else "remove"
            ctx.emit({"type": "forget", "group": g.key, "snapshot": d.snapshot_id, "time": d.snapshot.time,
                      "action": action, "reasons": d.reasons, "dry_run": a.dry_run},
                     f"  {action:<7}{short_id(d.snapshot_id)}  {when(d.snapshot)}  "
                     + ("; ".join(d.reasons) if d.reasons else "no rule keeps it"))
            if d.keep:
                kept += 1
            elif a.dry_run or _delete(ctx, repo, d.snapshot_id):
                removed += 1
            else:
                kept += 1
    ctx.emit({"type": "forget_summary", "kept": kept, "removed": removed, "dry_run": a.dry_run},
             f"{'would remove' if a.dry_run else 'removed'} {removed} snapshot(s), kept {kept}"
             + ("; run 'deltavault prune' to free their data" if removed and not a.dry_run and not a.prune
                else ""))


def _then_prune(ctx: Context) -> int:
    """--prune: prune as its own command would, once forget's lock is let go (prune takes
    its own locks). With --dry-run, prune too only says what it would do."""
    if not ctx.args.prune:
        return 0
    from deltavault.cli import cmd_prune

    ctx.args.repack_threshold = 0.2
    return cmd_prune.run(ctx)


def _forget_ids(ctx: Context, repo: Repository, refs: list[str], dry_run: bool) -> None:
    ids = []
    for ref in refs:
        if ref == "latest":
            raise UsageError("name snapshots by id to forget them, not 'latest'")
        ids.append(repo.resolve_snapshot(ref)[0])
    removed = 0
    for sid in dict.fromkeys(ids):
        ctx.emit({"type": "forget", "snapshot": sid, "action": "remove", "reasons": ["named"], "dry_run": dry_run},
                 f"  remove {short_id(sid)}  (named)")
        if dry_run or _delete(ctx, repo, sid):
            removed += 1
    kept = len(set(ids)) - removed
    ctx.emit({"type": "forget_summary", "kept": kept, "removed": removed, "dry_run": dry_run},
             f"{'would remove' if dry_run else 'removed'} {removed} snapshot(s)"
             + (f", kept {kept} under retention" if kept else ""))


def _delete(ctx: Context, repo: Repository, sid: str) -> bool:
    """Forget one snapshot; False (said) when Object Lock retention keeps it."""
    try:
        repo.delete_snapshot(sid)
    except ObjectRetained as exc:
        ctx.emit({"type": "forget_retained", "snapshot": sid, "until": exc.until},
                 f"  kept   {short_id(sid)}  under Object Lock retention until "
                 f"{exc.until[:16].replace('T', ' ')} UTC: forget it after that")
        return False
    return True
