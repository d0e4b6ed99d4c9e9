"""deltavault rewrite: drop paths from existing snapshots (prune then frees their data)."""

from __future__ import annotations

import argparse

import msgspec

from deltavault.cli.common import Context, human
from deltavault.cli.snapshot_filters import add_filters, filtered
from deltavault.errors import ExitCode, UsageError
from deltavault.fs.paths import display, exact
from deltavault.fs.patterns import Pattern, PatternSet, read_pattern_file
from deltavault.fs.sources import SnapshotMatcher
from deltavault.maintenance.rewrite import kept_paths, replace_snapshot, rewrite_tree
from deltavault.objects.trees import load_nodes
from deltavault.repository.hosttag import carried_tag
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rewrite", help="drop paths from existing snapshots (the next prune frees their data)")
    p.add_argument("snapshots", nargs="*", help="snapshots to rewrite (default: all that pass the filters)")
    p.add_argument("-e", "--exclude", action="append", default=[], metavar="PATTERN",
                   help="drop what matches, and what is below it (repeatable)")
    p.add_argument("--iexclude", action="append", default=[], metavar="PATTERN", help="as --exclude, ignoring case")
    p.add_argument("--exclude-file", action="append", default=[], metavar="FILE", help="patterns from FILE")
    p.add_argument("-n", "--dry-run", action="store_true", help="say what would be dropped; change nothing")
    p.add_argument("--keep-original", action="store_true",
                   help="keep each original snapshot beside its rewritten copy (then prune frees nothing)")
    p.add_argument("--forget", action="store_true", help="forget the originals (the default; for restic scripts)")
    add_filters(p)
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    excludes = [*a.exclude, *(p for f in a.exclude_file for p in read_pattern_file(f))]
    if not excludes and not a.iexclude:
        raise UsageError("rewrite needs what to drop: --exclude PATTERN (or --iexclude, --exclude-file)")
    if a.keep_original and a.forget:
        raise UsageError("--keep-original and --forget contradict each other")
    for text in [*excludes, *a.iexclude]:
        Pattern(text)
    pats = PatternSet(excludes, ignore_case=a.iexclude)
    repo = ctx.open_repo()
    rewritten = refused = 0
    with repo.lock(command="rewrite", wait=a.lock_wait):
        snaps = [(sid, s) for sid, s in filtered(repo, a, a.snapshots) if s.tree is not None]
        for sid, snap in snaps:
            res = rewrite_tree(repo, snap, SnapshotMatcher(pats, snap.paths), dry_run=a.dry_run)
            for path, n in res.removed:
                ctx.emit({"type": "removed", "snapshot": sid, "path": exact(path), "node_type": n.type.value,
                          "size": n.size, "dry_run": a.dry_run},
                         f"  {'would drop' if a.dry_run else 'dropped'} {display(path)}")
            if not res.removed:
                continue
            if res.tree is None:
                refused += 1
                ctx.emit({"type": "problem", "snapshot": sid, "kind": "empty",
                          "message": "every entry matches: the snapshot would be empty; left as it is"},
                         f"{short_id(sid)}: every entry matches: it would be empty; left as it is")
                continue
            rewritten += 1
            if a.dry_run:
                continue
            repo.flush()  # the new trees are stored and indexed before the snapshot naming them
            top = {n.name for n in load_nodes(repo, res.tree)}
            summary = msgspec.structs.replace(snap.summary, bytes_total=res.bytes_total) if snap.summary else None
            # a new tree: the host tag, which binds the old one, is dropped
            new = carried_tag(snap, msgspec.structs.replace(snap, tree=res.tree, paths=kept_paths(snap, top),
                                                            summary=summary))
            if a.keep_original:
                nid = repo.save_snapshot(msgspec.structs.replace(new, original=snap.original or sid))
            else:
                nid = replace_snapshot(repo, sid, snap, new)
            ctx.emit({"type": "rewrite", "snapshot": sid, "new_id": nid, "removed": len(res.removed),
                      "bytes_removed": sum(n.size for _, n in res.removed)},
                     f"{short_id(sid)} -> {short_id(nid)}: dropped {len(res.removed)} entr"
                     f"{'y' if len(res.removed) == 1 else 'ies'} ({human(sum(n.size for _, n in res.removed))})")
    unused = pats.unused()
    verb = "would rewrite" if a.dry_run else "rewrote"
    ctx.emit({"type": "rewrite_summary", "rewritten": rewritten, "considered": len(snaps), "refused": refused,
              "dry_run": a.dry_run, "unmatched": unused},
             f"{verb} {rewritten} of {len(snaps)} snapshot(s)"
             + (f"; nothing matches {', '.join(repr(u) for u in unused)}" if unused else "")
             + ("; run 'deltavault prune' to free the data" if rewritten and not a.dry_run and not a.keep_original
                else ""))
    return int(ExitCode.PARTIAL) if refused else 0
