"""The snapshot filters several commands share (find, snapshots, forget, tag, rewrite,
copy): --host, --tag, --path, as restic spells them."""

from __future__ import annotations

import argparse

from deltavault.model.snapshot import Snapshot
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import select_snapshots


def add_filters(p: argparse.ArgumentParser, what: str = "snapshots") -> None:
    p.add_argument("--host", action="append", default=[], metavar="HOST",
                   help=f"only {what} of HOST (repeatable: any of them)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG[,TAG...]",
                   help=f"only {what} with these tags (repeatable: any of them; a,b: both)")
    p.add_argument("--path", action="append", default=[], metavar="PATH",
                   help=f"only {what} of this source path (repeatable: all of them)")


def filtered(repo: Repository, a: argparse.Namespace,
             ids: list[str] | None = None) -> list[tuple[str, Snapshot]]:
    """The snapshots named by ``ids`` (id, prefix, latest), or else every snapshot, that
    pass the filters; oldest first."""
    if ids:
        snaps = list(dict(repo.resolve_snapshot(ref) for ref in ids).items())
        snaps.sort(key=lambda x: (x[1].time_ns, x[0]))
    else:
        snaps = repo.list_snapshots()
    return select_snapshots(snaps, hosts=a.host, tags=a.tag, paths=a.path)
