"""deltavault stats: sizes and ratios."""

from __future__ import annotations

import argparse

from deltavault.cli.common import Context, human
from deltavault.maintenance.stats import compute_stats


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="repository and snapshot statistics")
    p.add_argument("snapshots", nargs="*", help="only these snapshots (default: all)")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo()
    ids = [repo.resolve_snapshot(s)[0] for s in a.snapshots] if a.snapshots else None
    st = compute_stats(repo, ids)
    ctx.emit({"type": "stats", **st.__dict__},
             f"snapshots:          {st.snapshots}\n"
             f"packs:              {st.packs} ({human(st.pack_bytes)} stored)\n"
             f"blobs:              {st.blobs} ({human(st.blobs_raw_bytes)} before compression)\n"
             f"files:              {st.files}\n"
             f"restore size:       {human(st.restore_size)}\n"
             f"unique data:        {human(st.unique_raw_bytes)}\n"
             f"deduplication:      {st.dedup_ratio:.2f}x\n"
             f"compression:        {st.compression_ratio:.2f}x")
    return 0
