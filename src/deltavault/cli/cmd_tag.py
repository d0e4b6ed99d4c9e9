"""deltavault tag: add, remove or set the tags of snapshots."""

from __future__ import annotations

import argparse

import msgspec

from deltavault.cli.common import Context
from deltavault.cli.snapshot_filters import add_filters, filtered
from deltavault.errors import UsageError
from deltavault.fs.paths import shown
from deltavault.maintenance.rewrite import new_tags, replace_snapshot
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tag", help="add, remove or set tags of snapshots")
    p.add_argument("snapshots", nargs="*", help="snapshots to tag (default: all that pass the filters)")
    p.add_argument("--add", action="append", default=[], metavar="TAG", help="add TAG (repeatable; a,b: both)")
    p.add_argument("--remove", action="append", default=[], metavar="TAG", help="remove TAG (repeatable)")
    p.add_argument("--set", dest="set_", action="append", metavar="TAG",
                   help="replace all tags by these (repeatable; --set '' clears them)")
    add_filters(p)
    p.set_defaults(func=run)


def _split(values: list[str]) -> list[str]:
    return [t for v in values for t in v.split(",") if t]


def run(ctx: Context) -> int:
    a = ctx.args
    if not (a.add or a.remove or a.set_ is not None):
        raise UsageError("tag needs --add, --remove or --set")
    if a.set_ is not None and (a.add or a.remove):
        raise UsageError("--set replaces every tag: use it alone, or --add and --remove")
    add, remove = _split(a.add), _split(a.remove)
    set_ = _split(a.set_) if a.set_ is not None else None
    repo = ctx.open_repo()
    changed = 0
    with repo.lock(command="tag", wait=a.lock_wait):
        snaps = filtered(repo, a, a.snapshots)
        for sid, snap in snaps:
            tags = new_tags(snap.tags, add=add, remove=remove, set_=set_)
            if tags == snap.tags:
                continue
            nid = replace_snapshot(repo, sid, snap, msgspec.structs.replace(snap, tags=tags))
            changed += 1
            ctx.emit({"type": "tag", "snapshot": sid, "new_id": nid, "tags": tags},
                     f"{short_id(sid)} -> {short_id(nid)}: [{', '.join(map(shown, tags))}]")
    ctx.emit({"type": "tag_summary", "changed": changed, "considered": len(snaps)},
             f"changed the tags of {changed} of {len(snaps)} snapshot(s)")
    return 0
