"""Matplotlib figures as inline SVG for one HTML page.

Text stays text (``svg.fonttype`` none: no glyph outlines, no font files), ids are made
unique per figure (several SVGs share one document, and matplotlib numbers its ids per
figure), and the output is deterministic (fixed hash salt, no date).

Hover text: a collection given a gid has each of its items drawn as one element, in order;
``titled`` wraps item i in ``<g id="PREFIX-ITEM-i">`` with a ``<title>`` (the browser's
tooltip), so a region of a heatmap can be found in the page and named on hover.
"""

from __future__ import annotations

import html
import io
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import matplotlib
from matplotlib.figure import Figure

STYLE: dict[Any, Any] = {
    "svg.fonttype": "none",
    # Labels carry names from the backup source (directories, host names, change sources):
    # text is text. With mathtext on, a name such as "$\\bogus$" raised while drawing (the
    # whole report failed) and "$x$" was typeset instead of shown.
    "text.parse_math": False,
    "svg.hashsalt": "deltavault",
    "font.size": 8.5,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],  # ships with matplotlib: its metrics lay the text out
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e4e4e4",
    "grid.linewidth": 0.6,
    "axes.edgecolor": "#888888",
    "axes.titlesize": 9.5,
    "axes.titleweight": "bold",
    "legend.frameon": False,
    "legend.fontsize": 8,
    "path.simplify": True,
}

_ID = re.compile(r'\bid="([^"]+)"')
_REF = re.compile(r'(url\(#|xlink:href="#|href="#)([^)"]+)')
_ITEM = re.compile(r"<(?:path|use)\b[^>]*/>", re.S)


@contextmanager
def style() -> Iterator[None]:
    # Matplotlib's warnings would reach the terminal: only the cli prints, and a chart
    # that matplotlib finds awkward (one date) still draws.
    with matplotlib.rc_context(STYLE), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def render(fig: Figure, prefix: str, *, titled: dict[str, Callable[[int], str]] | None = None,
           label: str = "") -> str:
    """``fig`` as an ``<svg>`` element whose ids start with ``prefix``-. ``titled``: for a
    collection's gid, the hover text of its i-th item."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    for gid, title_of in (titled or {}).items():
        text = _title_items(text, gid, title_of)
    text = _ID.sub(lambda m: f'id="{prefix}-{m.group(1)}"', text)
    text = _REF.sub(lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", text)
    # Sized by the page (CSS), not in points: the viewBox keeps the proportions.
    text = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="chart"', text, count=1)
    if label:
        text = text.replace("<svg", f'<svg role="img" aria-label="{html.escape(label)}"', 1)
    return text


def _title_items(text: str, gid: str, title_of: Callable[[int], str]) -> str:
    start = text.find(f'<g id="{gid}">')
    if start < 0:
        return text
    body_start = start + len(f'<g id="{gid}">')
    end = text.index("</g>", body_start)
    body = text[body_start:end]
    count = iter(range(1 << 62))

    def wrap(m: re.Match[str]) -> str:
        i = next(count)
        return f'<g id="{gid}-{i}"><title>{html.escape(title_of(i))}</title>{m.group(0)}</g>'

    return text[:body_start] + _ITEM.sub(wrap, body) + text[end:]
