"""Numbers and names as the report shows them."""

from __future__ import annotations


def human(n: float) -> str:
    neg = n < 0
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            text = f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            return "-" + text if neg else text
        n /= 1024
    raise AssertionError("unreachable")


def short_path(path: str, width: int) -> str:
    """``path`` in at most ``width`` characters, its middle elided."""
    if len(path) <= width:
        return path
    keep = width - 1
    return path[:keep // 3] + "…" + path[-(keep - keep // 3):]


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"
