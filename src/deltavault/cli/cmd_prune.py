"""deltavault prune: remove data that no snapshot references."""

from __future__ import annotations

import argparse

from deltavault.cli.common import Context, human
from deltavault.maintenance.prune import PruneOptions, prune


def _share(text: str) -> float:
    v = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError("give a share in (0, 1] or a percentage such as 20%")
    return v


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove unreferenced data (plans under a shared lock, "
                                     "deletes under a brief exclusive one)")
    p.add_argument("--repack-threshold", type=_share, default=0.2, metavar="SHARE",
                   help="repack a pack once this share of it is unused (default 0.2, or e.g. 20%%)")
    p.add_argument("-n", "--dry-run", action="store_true", help="show what would be removed; change nothing")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo()
    rep = prune(repo, PruneOptions(repack_threshold=a.repack_threshold, dry_run=a.dry_run,
                                   lock_wait=a.lock_wait),
                progress=ctx.progress_line)
    verb = "would" if a.dry_run else "did"
    text = "\n".join([
        f"snapshots: {rep.snapshots}; blobs: {rep.blobs} ({rep.blobs_used} used); packs: {rep.packs}",
        f"{verb} delete {rep.packs_delete} unused pack(s) and repack {rep.packs_repack} partly used one(s)"
        + (f"; {rep.orphans_adopted} orphan pack(s) adopted first" if rep.orphans_adopted else ""),
        *([f"re-checked {rep.new_snapshots_rechecked} snapshot(s) saved meanwhile; "
           f"{rep.packs_resurrected} pack(s) kept for them"] if rep.new_snapshots_rechecked else []),
        *([f"kept {rep.packs_retained} unused pack(s) under Object Lock retention (until "
           f"{rep.retained_until[:16].replace('T', ' ')} UTC at the latest); a prune after that removes them"]
          if rep.packs_retained else []),
        *([f"left {rep.index_files_retained} superseded index file(s) under retention"]
          if rep.index_files_retained else []),
        *([f"left alone (unreadable blobs; run check): {d}" for d in rep.damaged_skipped]),
        *([f"{verb} remove {rep.temp_files_removed} temporary file(s) of interrupted writes "
           f"({human(rep.temp_bytes_removed)})"] if rep.temp_files_removed else []),
        f"{'would free' if a.dry_run else 'freed'} {human(max(rep.bytes_freed, 0))}; "
        f"{human(rep.bytes_unused_kept)} unused left in packs under the threshold",
        *([] if a.dry_run else [f"exclusive lock held {rep.exclusive_seconds:.2f} s "
                                f"(planning took {rep.plan_seconds:.2f} s under a shared lock)"]),
    ])
    ctx.emit({"type": "prune_summary", **rep.__dict__}, text)
    return 0
