#!/usr/bin/env python3
"""The plot of bench/sparse_volume.py's results (docs/benchmarks.md, "Scale: a 1 TiB sparse volume").

From ``--json`` (bench/results/sparse_volume.json: the ``ext4``, ``raw`` and ``peers``
scenarios) it draws, per step (full, 1% changed, no change, restore), one bar per tool and
scenario: wall time; bytes read, as /proc/PID/io counts them for the process tree:
``rchar`` (every byte read(2) and kin returned, holes read as zeros included) and
``read_bytes`` (fetched from storage: the page cache is dropped before each run, so these
are the source's and the repository's bytes read from disk); peak RSS of the process tree. Bars are medians over
the rounds, the whiskers span min to max; a run killed at the timeout is hatched and shows
what it had done by then.

    .venv/bin/python bench/sparse_volume_plot.py [--json bench/results/sparse_volume.json]
        [--out docs/scale-volume.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("full", "incremental (1% changed)", "incremental (no change)", "restore --volume (last)")
LABELS = ("full", "1% changed", "no change", "restore")
PANELS = (("seconds", "wall time, s", 1.0), ("rchar", "read with read(2) and kin (rchar), GB", 1e-9),
          ("read_bytes", "read from storage (read_bytes), GB", 1e-9),
          ("tree_rss_mib", "peak RSS of the process tree, MiB", 1.0))


def series(doc: dict) -> dict[str, dict[str, list[dict]]]:
    """Runs by bar (tool and scenario) and step."""
    out: dict[str, dict[str, list[dict]]] = {}
    for scen in ("ext4", "raw"):
        for r in doc.get(scen, {}).get("runs", []):
            out.setdefault(f"deltavault, {scen}", {}).setdefault(r["step"], []).append(r)
    peers = doc.get("peers", {})
    for key, name in (("borg_sparse", "borg --sparse fixed 4 MiB, ext4"), ("restic", "restic, ext4"),
                      ("borg_default", "borg default chunker, ext4")):
        for r in peers.get(key, []):
            step = r["step"].split(": ", 1)[1]
            out.setdefault(name, {}).setdefault(step, []).append(r)
    return out


def plot(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    bars = series(doc)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(18, 5))
    width = 0.8 / max(len(bars), 1)
    for ax, (key, title, scale) in zip(axes, PANELS, strict=True):
        for i, (name, steps) in enumerate(bars.items()):
            xs, ys, lo, hi, killed = [], [], [], [], []
            for j, step in enumerate(STEPS):
                runs = [r for r in steps.get(step, []) if key in r]
                if not runs:
                    continue
                v = [r[key] * scale for r in runs]
                xs.append(j + (i - (len(bars) - 1) / 2) * width)
                ys.append(statistics.median(v))
                lo.append(ys[-1] - min(v))
                hi.append(max(v) - ys[-1])
                killed.append(any(r.get("timed_out") for r in runs))
            if not xs:
                continue
            cont = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=f"C{i}", label=name)
            for patch, k in zip(cont.patches, killed, strict=True):
                if k:
                    patch.set_hatch("//")
                    patch.set_alpha(0.6)
        ax.set_xticks(range(len(STEPS)), LABELS)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize="small", title="hatched: killed at the timeout", title_fontsize="small")
    date = doc.get("ext4", {}).get("date", "")
    fig.suptitle(f"1 TiB sparse image, 4 GiB of data (bench/sparse_volume.py, {date}; shared 2-core VM)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "sparse_volume.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "scale-volume.png")
    a = ap.parse_args()
    plot(json.loads(a.json.read_text()), a.out)


if __name__ == "__main__":
    main()
