"""deltavault repair: rebuild the index from the packs, drop what is lost, report it."""

from __future__ import annotations

import argparse

from deltavault.cli.common import Context
from deltavault.errors import ExitCode
from deltavault.fs.paths import one_line
from deltavault.maintenance.config_repair import check_or_rebuild_config
from deltavault.maintenance.repair import repair
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repair", help="rebuild the index from the packs; report (and optionally mark) lost data")
    p.add_argument("--rewrite-snapshots", action="store_true",
                   help="replace damaged snapshots by copies whose lost ranges read as zeros, lost "
                        "directories as empty, damaged files marked with xattr user.deltavault.damaged")
    p.add_argument("-n", "--dry-run", action="store_true", help="read and report only; change nothing")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    fixed = check_or_rebuild_config(ctx.backend(), ctx.password_source(), dry_run=a.dry_run,
                                    cache_root=ctx.cache_root(), unencrypted=a.insecure_no_encryption)
    if fixed.state != "sound":
        how = "; ".join(f"{k}: {v}" for k, v in sorted(fixed.sources.items()))
        ctx.warn(f"{fixed.problem}: it {'would be' if a.dry_run else 'was'} rebuilt ({how})")
        if a.dry_run:
            ctx.emit({"type": "repair_config", "state": fixed.state, "problem": fixed.problem,
                      "sources": fixed.sources})
            return int(ExitCode.CORRUPT)
    repo = ctx.open_repo(use_cache=False, tolerant=True)
    rep = repair(repo, rewrite=a.rewrite_snapshots, dry_run=a.dry_run, lock_wait=a.lock_wait,
                 progress=ctx.progress_line)
    for name in rep.damaged_index_files:
        ctx.warn(f"damaged index file {name} {'would be' if a.dry_run else 'was'} replaced")
    for p in rep.packs_salvaged:
        ctx.warn(f"pack {p} is damaged: its good blobs {'would be' if a.dry_run else 'were'} moved to new packs")
    for p in rep.packs_unreadable:
        ctx.warn(f"pack {p}: unreadable, its blobs are lost")
    for p in rep.packs_left:
        ctx.warn(f"pack {one_line(p)}: the store did not answer; left as it was: run repair again")
    for sid in rep.snapshots_removed:
        ctx.warn(f"snapshot {short_id(sid)} was unreadable and was removed")
    lines = [f"{'would index' if a.dry_run else 'indexed'} {rep.blobs_indexed} blobs from {rep.packs} packs "
             f"({rep.packs_sound} sound, {len(rep.packs_salvaged)} damaged, {rep.blobs_salvaged} blobs saved "
             f"from them); {rep.blobs_lost} blob(s) lost"]
    for sid, paths in sorted(rep.affected.items()):
        lines.append(f"snapshot {short_id(sid)} lost data in: {', '.join(paths[:20])}"
                     + (" ..." if len(paths) > 20 else "")
                     + (f" -> rewritten as {short_id(rep.rewritten[sid])}" if sid in rep.rewritten else ""))
    ctx.emit({"type": "repair_summary", **rep.__dict__, "config": fixed.state}, "\n".join(lines))
    lost = rep.blobs_lost or rep.affected or rep.snapshots_removed
    # 13 whenever data was found lost, even once marked: scripts must notice; 15 when some
    # pack could not be read, so could not be judged.
    return int(ExitCode.CORRUPT) if lost else int(ExitCode.BACKEND) if rep.packs_left else 0
