"""deltavault diff: what changed between two snapshots."""

from __future__ import annotations

import argparse

from deltavault.cli.common import Context, human
from deltavault.errors import UsageError
from deltavault.fs.paths import display, exact
from deltavault.objects.diff import diff_trees


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="show differences between two snapshots")
    p.add_argument("snapshot1")
    p.add_argument("snapshot2")
    p.add_argument("--metadata", action="store_true", help="also list metadata-only changes")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo()
    _, s1 = repo.resolve_snapshot(a.snapshot1)
    _, s2 = repo.resolve_snapshot(a.snapshot2)
    if s1.tree is None or s2.tree is None:
        raise UsageError("diff compares files snapshots")
    counts = {"+": 0, "-": 0, "M": 0, "m": 0, "T": 0}
    added = removed = 0
    for ch in diff_trees(repo, s1.tree, s2.tree):
        counts[ch.kind] += 1
        if ch.kind == "m" and not a.metadata:
            continue
        if ch.new is not None and ch.kind in "+M":
            added += ch.new.size
        if ch.old is not None and ch.kind in "-":
            removed += ch.old.size
        ctx.result({"type": "change", "kind": ch.kind, "path": exact(ch.path), "path_hex": ch.path.hex()}, f"{ch.kind}    {display(ch.path)}")
    ctx.result({"type": "diff_summary", "added": counts["+"], "removed": counts["-"], "modified": counts["M"],
              "metadata": counts["m"], "type_changed": counts["T"]},
             f"\n{counts['+']} added, {counts['-']} removed, {counts['M']} modified, "
             f"{counts['m']} metadata-only, {counts['T']} type changes; "
             f"{human(added)} in new or changed files, {human(removed)} in removed files")
    return 0
