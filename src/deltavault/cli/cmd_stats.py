"""deltavault stats: sizes and ratios, as a summary or in one of restic's modes."""

from __future__ import annotations

import argparse

from deltavault.cli.common import Context, human
from deltavault.cli.snapshot_filters import add_filters, filtered
from deltavault.maintenance.stats import MODES, compute_stats, mode_stats


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="repository and snapshot statistics")
    p.add_argument("snapshots", nargs="*", help="only these snapshots (default: all that pass the filters)")
    p.add_argument("--mode", choices=MODES, default="summary",
                   help="restore-size: what a restore writes; files-by-contents: distinct file contents; "
                        "raw-data: the blobs used, before and after compression; summary (default): the "
                        "repository's totals")
    add_filters(p)
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo()
    chosen = a.snapshots or a.host or a.tag or a.path
    ids = [sid for sid, _ in filtered(repo, a, a.snapshots)] if chosen else None
    if a.mode == "summary":
        st = compute_stats(repo, ids)
        ctx.result({"type": "stats", "mode": "summary", **st.__dict__},
                   f"snapshots:          {st.snapshots}\n"
                   f"packs:              {st.packs} ({human(st.pack_bytes)} stored)\n"
                   f"blobs:              {st.blobs} ({human(st.blobs_raw_bytes)} before compression)\n"
                   f"files:              {st.files}\n"
                   f"restore size:       {human(st.restore_size)}\n"
                   f"unique data:        {human(st.unique_raw_bytes)}\n"
                   f"deduplication:      {st.dedup_ratio:.2f}x\n"
                   f"compression:        {st.compression_ratio:.2f}x")
        return 0
    m = mode_stats(repo, a.mode, ids)
    obj = {"type": "stats", "mode": m.mode, "snapshots": m.snapshots}
    if a.mode == "raw-data":
        obj.update(blobs=m.blobs, raw_bytes=m.raw_bytes, stored_bytes=m.stored_bytes, **m.extra)
        text = (f"stats in raw-data mode over {m.snapshots} snapshot(s):\n"
                f"blobs:              {m.blobs}\n"
                f"before compression: {human(m.raw_bytes)}\n"
                f"stored:             {human(m.stored_bytes)}\n"
                f"compression:        {m.extra['compression_ratio']:.2f}x")
    else:
        obj.update(files=m.files, bytes=m.bytes)
        text = (f"stats in {a.mode} mode over {m.snapshots} snapshot(s):\n"
                f"files:              {m.files}\n"
                f"total size:         {human(m.bytes)}")
    ctx.result(obj, text)
    return 0
