"""The report's charts, drawn by matplotlib (docs/design.md, "Reports", says why matplotlib).

Each function takes report data and returns one inline ``<svg>``. Many runs are drawn as
lines and collections, not one artist each: a figure's cost grows with its artists, and a
report of 1,000 snapshots must render in well under 3 s of CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.dates as mdates
import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.colors import LinearSegmentedColormap, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator

from deltavault.maintenance.report.data import Health, Heatmap, Source, WhereBytes
from deltavault.maintenance.report.fmt import human, short_path
from deltavault.maintenance.report.heatmap import partition_of, region_range
from deltavault.maintenance.report.svg import render

READ, ADDED, CHANGED, FAILED, PARTIAL = "#4a7ab8", "#3c9a5f", "#c0392b", "#d62728", "#e69500"
SOURCE_COLORS = ["#4a7ab8", "#8e6bbf", "#3c9a5f", "#e69500", "#c0392b", "#7f7f7f", "#17becf"]
UNCHANGED = "#ececec"
READ_ONLY = "#a9c8ea"
HEAT = LinearSegmentedColormap.from_list("dv-heat", ["#fde8a8", "#f5a04a", "#d9472b", "#7a0c1e"])
PART_COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
MARKERS_UP_TO = 150  # more runs than this: lines only, with markers for the special runs


def _dates(ns: list[int]) -> np.ndarray:
    return np.asarray(ns, dtype="datetime64[ns]")  # matplotlib plots datetime64 as dates (UTC)


def _date_axis(ax: Axes, x: np.ndarray) -> None:
    if len(x) and x.max() == x.min():  # one run: an hour around it, not a span of nothing
        ax.set_xlim(x.min() - np.timedelta64(30, "m"), x.min() + np.timedelta64(30, "m"))
    loc = mdates.AutoDateLocator(maxticks=8)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))  # type: ignore[no-untyped-call]


def _count_axis(ax: Axes, values: list[int]) -> None:
    """Logarithmic when the counts span more than two orders of magnitude (unchanged files
    beside a few new ones), else linear."""
    nonzero = [v for v in values if v > 0]
    if nonzero and max(nonzero) > 100 * min(nonzero):
        ax.set_yscale("symlog", linthresh=10)
        ax.yaxis.set_minor_locator(NullLocator())
    else:
        ax.set_ylim(bottom=0)


def _bytes_axis(ax: Axes) -> None:
    ax.set_yscale("symlog", linthresh=1024)
    ax.yaxis.set_minor_locator(NullLocator())  # dozens of minor ticks a decade: time, no insight
    ax.yaxis.set_major_formatter(lambda v, _pos: human(v) if v else "0")


def timeline(src: Source, prefix: str) -> str:
    runs = [r for r in src.runs if r.status != "failed"]
    failed = [r for r in src.runs if r.status == "failed"]
    volume = src.kind == "volume"
    fig = Figure(figsize=(9.6, 5.2))
    axes = fig.subplots(3, 1, sharex=True)
    fig.subplots_adjust(left=0.09, right=0.77, top=0.95, bottom=0.08, hspace=0.25)
    x = _dates([r.time_ns for r in runs])
    marker = "o" if len(runs) <= MARKERS_UP_TO else None
    ax = axes[0]
    ax.set_title("bytes read from the source, and added to the repository", loc="left", y=1.0)
    ax.plot(x, [r.bytes_read for r in runs], color=READ, marker=marker, ms=3.5, lw=1.2, label="read")
    ax.plot(x, [r.bytes_added for r in runs], color=ADDED, marker=marker, ms=3.5, lw=1.2, label="added")
    _bytes_axis(ax)
    special = [(i, r) for i, r in enumerate(runs) if r.status == "partial" or r.fallback]
    if special:
        xs = [x[i] for i, _ in special]
        ys = [r.bytes_read for _, r in special]
        ax.scatter(xs, ys, s=60, facecolors="none", linewidths=1.4,
                   edgecolors=[PARTIAL if r.status == "partial" else CHANGED for _, r in special], zorder=4)
    if failed:
        fx = _dates([r.time_ns for r in failed])
        for a in axes:
            a.vlines(fx, 0, 1, transform=a.get_xaxis_transform(), colors=FAILED, lw=1.2, linestyles="dashed")
    handles = [*ax.get_legend_handles_labels()[0],
               Patch(facecolor="none", edgecolor=CHANGED, label="fallback / full read"),
               Patch(facecolor="none", edgecolor=PARTIAL, label="partial run"),
               Patch(facecolor=FAILED, label="failed run (dashed)")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax = axes[1]
    ax.set_title("duration (s)", loc="left", y=1.0)
    labels = sorted({r.change_label for r in runs})
    colors = {lab: SOURCE_COLORS[i % len(SOURCE_COLORS)] for i, lab in enumerate(labels)}
    ax.plot(x, [r.seconds for r in runs], color="#999999", lw=1)
    ax.scatter(x, [r.seconds for r in runs], s=14, c=[colors[r.change_label] for r in runs], zorder=3)
    ax.legend(handles=[Patch(color=colors[lab], label=lab) for lab in labels], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), title="change source")
    ax.set_ylim(bottom=0)
    ax = axes[2]
    if volume:
        ax.set_title("blocks read and blocks really changed", loc="left", y=1.0)
        counts = [("read", READ, [r.blocks_read for r in runs]), ("changed", CHANGED, [r.blocks_changed for r in runs])]
    else:
        ax.set_title("files", loc="left", y=1.0)
        counts = [("new", ADDED, [r.files_new for r in runs]), ("changed", PARTIAL, [r.files_changed for r in runs]),
                  ("unchanged", "#999999", [r.files_unmodified for r in runs])]
    for name, color, ys in counts:
        ax.plot(x, ys, color=color, marker=marker, ms=3, lw=1.1, label=name)
    _count_axis(ax, [v for _, _, ys in counts for v in ys])
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _date_axis(axes[2], np.concatenate((x, _dates([r.time_ns for r in failed]))))
    return render(fig, prefix, label=f"timeline of {src.id}")


def heatmap(hm: Heatmap, prefix: str) -> str:
    """The volume as a grid of regions; each coloured by how many runs changed it."""
    cols, n = hm.columns, hm.regions
    rows = -(-n // cols)
    counts = np.asarray(hm.counts)
    top = max(1, int(counts.max(initial=0)))
    colors = [UNCHANGED if c == 0 else HEAT(0.15 + 0.85 * (c - 1) / max(1, top - 1)) for c in counts]
    idx = np.arange(n)
    x, y = idx % cols, idx // cols
    cell = 0.92
    verts = np.stack([np.stack([x, y], 1), np.stack([x + cell, y], 1), np.stack([x + cell, y + cell], 1),
                      np.stack([x, y + cell], 1)], 1)
    height = max(1.6, 0.45 + 0.16 * rows)  # inches: the grid, and a line of text under it
    fig = Figure(figsize=(9.6, height))
    ax = fig.add_axes((0.01, 0.35 / height, 0.80, 1 - 0.45 / height))
    cells = PolyCollection(list(verts), facecolors=colors, edgecolors="none")
    cells.set_gid("region")
    ax.add_collection(cells)
    marked = [p for p in hm.partitions if not (p.first_region == 0 and p.last_region == n - 1)]
    for i, p in enumerate(marked):  # a strip under the cells of each partition (not of the whole volume)
        color = PART_COLORS[i % len(PART_COLORS)]
        strips = [[(c, r + cell), (c + 1, r + cell), (c + 1, r + 1), (c, r + 1)]
                  for c, r in ((k % cols, k // cols) for k in range(p.first_region, p.last_region + 1))]
        ax.add_collection(PolyCollection(strips, facecolors=color, edgecolors="none"))
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_axis_off()
    handles = [Patch(color=UNCHANGED, label="no run changed it")]
    handles += [Patch(color=HEAT(0.15 + 0.85 * (c - 1) / max(1, top - 1)), label=f"changed in {c} run(s)")
                for c in sorted({1, (top + 1) // 2, top})]
    handles += [Patch(color=PART_COLORS[i % len(PART_COLORS)],
                      label=f"partition {p.number or '(whole volume)'}: {p.fs or 'not read'}")
                for i, p in enumerate(marked)]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.815, 0.98))
    fig.text(0.01, 0.08 / height, f"{n} regions of {human(hm.region_bytes)}, {cols} to a row, from offset 0; "
             "hover over a region for its offsets", fontsize=8, color="#555555")

    def title(i: int) -> str:
        a, b = region_range(hm, i)
        p = partition_of(hm, i)
        where = f"; partition {p.number or '(whole volume)'} {p.fs}".rstrip() if p else ""
        return f"region {i}: bytes {a:,}-{b - 1:,} ({human(a)}-{human(b)}){where}; changed in {hm.counts[i]} run(s)"

    return render(fig, prefix, titled={"region": title}, label=f"block-change heatmap of {hm.source}")


def run_blocks(hm: Heatmap, prefix: str) -> str:
    """One row per run: the regions it read (light) and those that really changed (dark).
    An image of runs x regions, embedded unresampled (``interpolation="none"``): a few KB
    where a rectangle per run of regions took close to 1 MB for 24 runs."""
    runs = hm.runs
    grid = np.zeros((len(runs), hm.regions), dtype=np.uint8)
    for row, r in enumerate(runs):
        for a, b in r.read:
            grid[row, a:b] = 1
        for a, b in r.changed:
            grid[row, a:b] = 2
    height = 1.0 + 0.24 * len(runs)
    fig = Figure(figsize=(9.6, height))
    ax = fig.add_axes((0.40, 0.45 / height, 0.57, 1 - 0.8 / height))
    ax.imshow(grid, cmap=ListedColormap([UNCHANGED, READ_ONLY, CHANGED]), vmin=0, vmax=2, aspect="auto",
              interpolation="none", extent=(0, hm.regions, len(runs) - 0.5, -0.5), gid="runs")
    ax.set_yticks(range(len(runs)))
    ax.set_yticklabels([f"{r.time[5:16].replace('T', ' ')} {r.change_label}: {r.blocks_read:,} read, "
                        + ("all new" if r.first else f"{r.blocks_changed:,} changed") for r in runs], fontsize=7)
    ax.grid(False)
    ticks = np.linspace(0, hm.regions, 5)
    ax.set_xticks(ticks)
    ax.set_xticklabels([human(t * hm.region_bytes) for t in ticks])
    ax.legend(handles=[Patch(color=UNCHANGED, label="not read"), Patch(color=READ_ONLY, label="read, unchanged"),
                       Patch(color=CHANGED, label="changed")], loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=3)
    return render(fig, prefix, label=f"blocks read and changed per run of {hm.source}")


def where(wb: WhereBytes, prefix: str) -> str:
    dirs = wb.directories[:15]
    fig = Figure(figsize=(9.6, 0.8 + 0.26 * max(1, len(dirs))))
    ax = fig.add_axes((0.36, 0.55 / (0.8 + 0.26 * max(1, len(dirs))), 0.6, 0.9 - 0.6 / (0.8 + 0.26 * max(1, len(dirs)))))
    y = np.arange(len(dirs))
    ax.hlines(y, 0, [d.bytes_own for d in dirs], colors=ADDED, lw=9)
    ax.set_yticks(y)
    ax.set_yticklabels([short_path(d.path, 60) for d in dirs], fontsize=7.5)
    ax.set_ylim(len(dirs) - 0.5, -0.5)
    ax.xaxis.set_major_formatter(lambda v, _pos: human(v))
    ax.set_xlim(left=0)
    ax.grid(axis="y", visible=False)
    return render(fig, prefix, label="bytes added by directory")


def health(h: Health, prefix: str) -> str:
    pts = h.series
    x = _dates([p.time_ns for p in pts])
    fig = Figure(figsize=(9.6, 4.2))
    axes = fig.subplots(2, 1, sharex=True)
    fig.subplots_adjust(left=0.09, right=0.77, top=0.94, bottom=0.09, hspace=0.3)
    ax = axes[0]
    ax.set_title("deduplication and compression, cumulative", loc="left", y=1.0)
    series: list[tuple[str, Callable[[int], float | None], str]] = [
        ("deduplication", lambda i: pts[i].dedup, "#8e6bbf"), ("compression", lambda i: pts[i].compression, READ),
        ("both (logical / stored)", lambda i: pts[i].saving, ADDED)]
    for name, get, color in series:
        ys = [get(i) for i in range(len(pts))]
        ax.plot(x, [np.nan if v is None else v for v in ys], color=color, lw=1.4, label=name)
    ax.set_ylabel("ratio (x)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax = axes[1]
    ax.set_title("size by snapshot", loc="left", y=1.0)
    ax.plot(x, [p.bytes_total for p in pts], color="#999999", lw=1.1, marker="." if len(pts) <= MARKERS_UP_TO else None,
            label="snapshot size")
    ax.plot(x, [p.bytes_added for p in pts], color=ADDED, lw=1.1, marker="." if len(pts) <= MARKERS_UP_TO else None,
            label="added by its run")
    _bytes_axis(ax)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _date_axis(axes[1], x)
    return render(fig, prefix, label="repository health")
