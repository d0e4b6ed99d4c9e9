"""Red-team tests of the commands and options of issues #19 and #15 (dump, copy, restore
--delete/--overwrite, backup's input options, rewrite/tag, report) against the threat
model of docs/security.md: a hostile source tree, restore target, cache and repository."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

from tests.conftest import Cli

MATH = "$\\bogus$"  # matplotlib's mathtext cannot parse it: a chart with it raised
MARKUP = "<script>alert(1)</script><img src=x onerror=alert(2)>"


def test_report_of_hostile_names_renders_escaped_and_never_crashes(cli: Cli, tmp_path: Path) -> None:
    """Directory names are the backup source's, so any user picks them: one that looks like
    matplotlib mathtext crashed ``report`` with a traceback (ParseFatalException); markup in
    names, host names and tags must come out as text."""
    assert cli("init").returncode == 0
    src = tmp_path / "src"
    for name in (MATH, MARKUP.replace("/", "_"), "plain"):
        d = src / name
        d.mkdir(parents=True)
        (d / "f").write_bytes(os.urandom(50_000))
    host = "h<b>x</b>'\"$\\alpha$"
    assert cli("backup", "--host", host, "--tag", MARKUP, str(src)).returncode == 0
    (src / MATH / "g").write_bytes(os.urandom(70_000))
    assert cli("backup", "--host", host, "--tag", MARKUP, str(src)).returncode == 0
    out = tmp_path / "r.html"
    r = cli("report", "--html", str(out))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    page = out.read_text()
    body = re.sub(r"<script type='application/json' id='report-data'>.*?</script>", "", page, flags=re.S)
    assert "<script>" not in body and "<img" not in body and "<b>" not in body
    assert html.escape(host) in body  # shown, as text
    # the name is shown as written, not typeset as math
    assert "\\bogus$" in body
