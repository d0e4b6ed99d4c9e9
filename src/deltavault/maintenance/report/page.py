"""The report as one self-contained HTML page: inline CSS, inline SVG charts, no script.

Nothing is fetched: the Content-Security-Policy forbids every load (``default-src 'none'``)
but inline styles and ``data:`` images, so a page opened offline looks the same, and a
name in the data can never make it reach out. The report's data rides along as JSON in a
``<script type="application/json">`` block, which browsers never execute: the page is a
view of it, and ``deltavault report --json`` prints the same.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from deltavault.maintenance.report import charts
from deltavault.maintenance.report.data import (
    Health,
    Heatmap,
    Report,
    Run,
    Source,
    WhereBytes,
    as_data,
)
from deltavault.maintenance.report.fmt import duration, human, ratio
from deltavault.maintenance.report.heatmap import partition_of, region_range
from deltavault.maintenance.report.svg import style

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
CSS = """
body{font:14px/1.45 "DejaVu Sans",Arial,sans-serif;color:#222;margin:0;background:#f6f6f4}
main{max-width:1180px;margin:0 auto;padding:12px 24px 48px}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:34px 0 8px;border-bottom:2px solid #ccc}
h3{font-size:15px;margin:22px 0 6px}section>p,.meta{color:#555}
.chart{width:100%;height:auto;background:#fff;border:1px solid #ddd;border-radius:4px}
table{border-collapse:collapse;font-size:12px;background:#fff;margin:6px 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#eee}
tr.failed td{background:#fde2e1}tr.partial td{background:#fff1d6}tr.fallback td.cs{background:#fbe3e3}
.ok{color:#1c7c3c;font-weight:bold}.bad{color:#b3261e;font-weight:bold}
.warn{background:#fff1d6;border:1px solid #e6c27a;padding:6px 10px;border-radius:4px}
nav a{margin-right:14px}details summary{cursor:pointer;color:#345}
"""
DETAILS_OPEN_UP_TO = 40  # rows; longer tables start folded


def _t(text: object) -> str:
    return escape(str(text))


def _time(ts: str) -> str:
    return _t(ts[:19].replace("T", " "))


def _table(head: list[str], rows: list[str], *, rows_label: str = "", cls: str = "") -> str:
    table = (f'<table{f" class={cls!r}" if cls else ""}><thead><tr>' + "".join(f"<th>{_t(h)}</th>" for h in head)
             + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    if len(rows) <= DETAILS_OPEN_UP_TO:
        return table
    return f"<details><summary>{len(rows)} {_t(rows_label or 'rows')}</summary>{table}</details>"


def _why(r: Run) -> str:
    parts = [f"{x['source']} passed over: {x['reason']}" for x in r.rejected] + r.notes
    if r.message:
        parts.insert(0, r.message)
    if r.incomplete:
        parts.append("incomplete: " + ", ".join(r.incomplete[:5]) + (" …" if len(r.incomplete) > 5 else ""))
    return "<br>".join(_t(p) for p in parts)


def _run_row(src: Source, r: Run) -> str:
    cls = r.status if r.status != "ok" else ("fallback" if r.fallback else "")
    what = (f'<td class="n">{r.blocks_read:,}</td><td class="n">{r.blocks_changed:,}</td>'
            f'<td class="n">{r.blocks_total:,}</td>' if src.kind == "volume" else
            f'<td class="n">{r.files_new:,}</td><td class="n">{r.files_changed:,}</td>'
            f'<td class="n">{r.files_unmodified:,}</td>')
    keep = _t(r.retention + (f" ({'; '.join(r.retention_reasons)})" if r.retention_reasons else ""))
    return (f'<tr class="{_t(cls)}" data-snapshot="{_t(r.snapshot)}" data-status="{_t(r.status)}"><td>{_time(r.time)}</td>'
            f"<td>{_t(r.snapshot[:8]) or '&ndash;'}</td><td>{_t(r.status)}</td><td class='n'>{duration(r.seconds)}</td>"
            f"<td class='n'>{human(r.bytes_read)}</td><td class='n'>{human(r.bytes_added)}</td>{what}"
            f"<td class='cs'>{_t(r.change_label)}</td><td>{_why(r)}</td><td>{keep}</td></tr>")


def _timeline(rep: Report) -> str:
    out = ['<section id="timeline"><h2>Timeline</h2><p>Each source\'s runs. Circled points: runs that fell '
           "back from a change source or read everything (red) and partial runs (orange); dashed lines: failed "
           "runs, which saved no snapshot.</p>"]
    for i, src in enumerate(rep.sources):
        failed = sum(1 for r in src.runs if r.status == "failed")
        partial = sum(1 for r in src.runs if r.status == "partial")
        out.append(f'<div class="source" data-kind="{_t(src.kind)}" data-runs="{len(src.runs)}">'
                   f"<h3>{_t(src.kind)}: {_t(', '.join(src.paths))} <span class='meta'>({_t(src.hostname)}, "
                   f"{len(src.runs)} runs, {partial} partial, {failed} failed)</span></h3>")
        if failed < len(src.runs):  # a source with nothing but failures has nothing to draw
            out.append(charts.timeline(src, f"tl{i}"))
        kind_cols = ["blocks read", "blocks changed", "blocks"] if src.kind == "volume" else \
            ["files new", "changed", "unchanged"]
        head = ["time (UTC)", "snapshot", "status", "duration", "read", "added", *kind_cols, "change source",
                "fallback, notes, errors", "retention"]
        out.append(_table(head, [_run_row(src, r) for r in reversed(src.runs)], rows_label="runs, newest first"))
        out.append("</div>")
    return "".join(out) + "</section>"


def _heatmap(hm: Heatmap, i: int) -> str:
    parts = [f'<div class="volume" data-source="{_t(hm.source)}" data-regions="{hm.regions}" '
             f'data-changed-regions="{sum(1 for c in hm.counts if c)}"><h3>{_t(hm.source)}</h3>'
             f"<p>{human(hm.size)} in {hm.regions} regions of {human(hm.region_bytes)}; coloured by how many of "
             f"the {len(hm.runs_counted)} incremental runs shown changed them (first runs, which store "
             "everything, are not counted)"
             + (f"; {hm.runs_without_blocks} older run(s) recorded no block sets" if hm.runs_without_blocks else "")
             + "." + "".join(f" {_t(p.fs)} over the whole volume." for p in hm.partitions
                             if p.number == 0 and p.fs) + "</p>", charts.heatmap(hm, f"hm{i}")]
    if hm.partitions:
        parts.append(_table(["partition", "file system", "offset", "size", "regions"], [
            f"<tr><td>{p.number or '(whole volume)'}</td><td>{_t(p.fs or 'not read')}</td><td class='n'>{p.offset:,}</td>"
            f"<td class='n'>{human(p.size)}</td><td class='n'>{p.first_region}&ndash;{p.last_region}</td></tr>"
            for p in hm.partitions]))
    hot = sorted((c, -r, r) for r, c in enumerate(hm.counts) if c)[::-1][:10]
    if hot:
        rows = []
        for c, _neg, r in hot:
            a, b = region_range(hm, r)
            p = partition_of(hm, r)
            rows.append(f"<tr><td class='n'>{r}</td><td class='n'>{a:,}&ndash;{b - 1:,}</td><td>{human(a)}&ndash;{human(b)}</td>"
                        f"<td>{_t(p.number or '(whole volume)') if p else '&ndash;'}</td><td class='n'>{c}</td></tr>")
        parts.append("<details open><summary>regions changed most</summary>"
                     + _table(["region", "bytes", "offsets", "partition", "runs that changed it"], rows) + "</details>")
    if hm.runs:
        parts.append(f"<h4>Blocks read against blocks changed, per run (the last {len(hm.runs)})</h4>"
                     "<p>Blue: read but unchanged (what the change source made the run read for nothing); "
                     "red: really changed (on a first run: read and stored).</p>" + charts.run_blocks(hm, f"rb{i}"))
    return "".join(parts) + "</div>"


def _where(wb: WhereBytes, i: int) -> str:
    frm = f"snapshot {_t(wb.snapshot_from[:8])}" if wb.snapshot_from else "nothing (the first snapshot)"
    parts = [f'<div class="files" data-source="{_t(wb.source)}"><h3>{_t(wb.source)}</h3>'
             f"<p>From {frm} to snapshot {_t(wb.snapshot_to[:8])}: {human(wb.bytes_added)} of content new to the "
             f"repository since the older snapshot, in {wb.files_new:,} new and {wb.files_changed:,} changed files "
             f"({wb.files_removed:,} removed).</p>"]
    if wb.directories:
        parts.append(charts.where(wb, f"wb{i}"))
        parts.append(_table(["directory", "added by its files", "with subdirectories", "files"], [
            f"<tr><td>{_t(d.path)}</td><td class='n'>{human(d.bytes_own)}</td><td class='n'>{human(d.bytes_total)}</td>"
            f"<td class='n'>{d.files:,}</td></tr>" for d in wb.directories]))
    if wb.largest:
        parts.append("<h4>Largest changes</h4>" + _table(["file", "change", "size", "added"], [
            f"<tr><td>{_t(f.path)}</td><td>{_t(f.change)}</td><td class='n'>{human(f.size)}</td>"
            f"<td class='n'>{human(f.bytes_added)}</td></tr>" for f in wb.largest]))
    return "".join(parts) + "</div>"


def _check_scope(chk: dict[str, Any]) -> str:
    if chk["read_data"]:
        return "reading all data"
    if chk.get("read_data_subset"):
        return f"reading data subset {_t(chk['read_data_subset'])}"
    return "structure only"


def _health(h: Health, rep: Report) -> str:
    chk = h.last_check
    if chk is None:
        check = "<p id='last-check' data-result='none'>No check is recorded: run <code>deltavault check</code>.</p>"
    else:
        verdict = "<span class='ok'>passed</span>" if chk["ok"] else "<span class='bad'>found errors</span>"
        check = (f"<p id='last-check' data-result='{'ok' if chk['ok'] else 'errors'}'>Last check: {_time(chk['time'])} "
                 f"UTC on {_t(chk['hostname'])}, {_check_scope(chk)}: "
                 f"{verdict} ({_t(chk['message'])}).</p>")
    stats = _table(["packs", "stored", "blobs", "before compression", "compression now", "deduplication now"], [
        f"<tr><td class='n'>{h.packs:,}</td><td class='n'>{human(h.pack_bytes)}</td><td class='n'>{h.blobs:,}</td>"
        f"<td class='n'>{human(h.blobs_raw_bytes)}</td><td class='n'>{ratio(h.compression_now)}</td>"
        f"<td class='n'>{ratio(h.dedup_now)}</td></tr>"])
    parts = ['<section id="health"><h2>Repository health</h2>', check, stats]
    if h.points_without_raw:
        parts.append(f"<p>{h.points_without_raw} older snapshot(s) did not record their raw bytes: "
                     "deduplication and compression leave them out.</p>")
    parts.append(charts.health(h, "hl"))
    if h.retention_policy is not None:
        rows = [f"<tr class='{_t(r.retention)}'><td>{_time(r.time)}</td><td>{_t(r.snapshot[:8])}</td>"
                f"<td>{_t(src.id)}</td><td>{_t(r.retention)}</td><td>{_t('; '.join(r.retention_reasons))}</td></tr>"
                for src in rep.sources for r in src.runs if r.retention]
        pol = ", ".join(f"{k} {v}" for k, v in h.retention_policy.items() if v not in (0, None, []))
        parts.append(f"<div id='retention' data-keep='{h.retention_keep}' data-forget='{h.retention_forget}'>"
                     f"<h3>Retention: {_t(pol)}</h3><p>Of all {h.retention_keep + h.retention_forget} snapshots, "
                     f"the policy keeps {h.retention_keep} and would forget {h.retention_forget}.</p>"
                     + _table(["time (UTC)", "snapshot", "source", "decision", "kept by"], rows,
                              rows_label="snapshots shown") + "</div>")
    return "".join(parts) + "</section>"


def render_html(rep: Report) -> str:
    # No "<" at all in the block (JSON reads \u003c back as "<"): escaping "</" alone let a
    # name holding "<!--<script>" put the browser's script parser in its double-escaped
    # state, where the block's own "</script>" no longer ends it.
    data = json.dumps(as_data(rep), separators=(",", ":")).replace("<", "\\u003c")
    head = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>deltavault report {_t(rep.repository[:8])}</title><style>{CSS}</style></head><body><main>")
    warn = "".join(f"<p class='warn'>{_t(w)}</p>" for w in rep.warnings)
    intro = (f"<h1>deltavault report</h1><p class='meta'>Repository {_t(rep.repository)} at {_t(rep.location)}; "
             f"{rep.snapshots} of {rep.snapshots_total} snapshots shown"
             + (f", since {_time(rep.since)} UTC" if rep.since else "") + f"; generated {_time(rep.generated)} UTC."
             "</p><nav><a href='#timeline'>Timeline</a><a href='#heatmap'>Block changes</a>"
             "<a href='#where'>Where the bytes went</a><a href='#health'>Health</a></nav>")
    with style():
        body = [_timeline(rep), '<section id="heatmap"><h2>Block changes</h2>']
        body += [_heatmap(hm, i) for i, hm in enumerate(rep.heatmaps)] or [
            "<p>No volume snapshot shown records block sets.</p>"]
        body.append('</section><section id="where"><h2>Where the bytes went</h2>')
        body += [_where(wb, i) for i, wb in enumerate(rep.where)] or ["<p>No files snapshot shown.</p>"]
        body.append("</section>")
        if rep.health is not None:
            body.append(_health(rep.health, rep))
    return (head + warn + intro + "".join(body)
            + f"<script type='application/json' id='report-data'>{data}</script></main></body></html>")
