"""deltavault report: one self-contained HTML page of what the backups did (``--json``: its data)."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

from deltavault.cli.cmd_forget import add_policy_options, group_by_of, policy_of
from deltavault.cli.common import Context, human
from deltavault.cli.outfile import OutputFile
from deltavault.errors import DeltavaultError, UsageError

DEFAULT_FILE = "deltavault-report.html"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="an HTML page: timeline, block changes, where the bytes went, health")
    p.add_argument("snapshots", nargs="*", metavar="SNAPSHOT", help="only these snapshots (ids, prefixes, latest)")
    p.add_argument("--html", metavar="FILE",
                   help=f"write the page to FILE (default {DEFAULT_FILE}; with --json, only if given)")
    p.add_argument("--since", metavar="DATE",
                   help="only snapshots since DATE: 2024-05-01, 2024-05-01T12:00 (local time unless it "
                        "ends in Z or an offset), or a span back from now: 30d, 12h")
    p.add_argument("--source", action="append", default=[], metavar="ID",
                   help="only this source: its source id, or a path it backs up (repeatable)")
    g = p.add_argument_group("retention to show (as forget would apply it; nothing is forgotten)")
    add_policy_options(g)
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    try:  # matplotlib and numpy are the optional extra "report"
        from deltavault.maintenance.report.build import build_report
        from deltavault.maintenance.report.data import as_data
        from deltavault.maintenance.report.page import render_html
        from deltavault.maintenance.report.select import ReportOptions
    except ImportError as exc:
        raise DeltavaultError(f"the report needs matplotlib: pip install 'deltavault[report]' ({exc})") from None
    policy = policy_of(a)
    opts = ReportOptions(snapshots=a.snapshots, sources=a.source, since=a.since,
                         policy=None if policy.empty() else policy, group_by=group_by_of(a))
    out = OutputFile(Path(a.html or DEFAULT_FILE), "the report", error=UsageError) if a.html or not ctx.json else None
    with out.writing() if out is not None else nullcontext() as f:
        repo = ctx.open_repo()
        with ctx.read_lock(repo, "report"):
            rep = build_report(repo, opts)
        size = 0
        if f is not None:
            page = render_html(rep).encode()
            f.write(page)
            size = len(page)
    where = str(out.path) if out is not None else None
    ctx.emit({"type": "report", "html": where, **as_data(rep)},
             f"report of {rep.snapshots} snapshot(s) of {len(rep.sources)} source(s) written to {where} "
             f"({human(size)})" + "".join(f"\nwarning: {w}" for w in rep.warnings))
    return 0
