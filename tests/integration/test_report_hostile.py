"""The report (--html, --json) of hostile names, snapshot strings and deep trees: escaped,
never crashed, bounded; its data block read back in a browser (split from
test_new_commands_hostile.py)."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import pytest

from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from tests.browser import CHROMIUM, Browser
from tests.conftest import Cli
from tests.integration.test_hostile_names import _raw_controls
from tests.integration.test_new_commands_hostile import _no_deep_leftovers, _save_tree  # noqa: F401 (an autouse fixture)

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


def test_report_escapes_a_snapshot_kind_in_its_attribute(make_repo) -> None:  # type: ignore[no-untyped-def]
    """Every string from a snapshot reaches the page escaped: the kind went into a
    ``data-kind`` attribute raw, so a snapshot whose kind carries a quote and markup could
    open an element of its own in the page."""
    from deltavault.maintenance.report.build import build_report
    from deltavault.maintenance.report.page import render_html
    from deltavault.maintenance.report.select import ReportOptions

    repo = make_repo()
    bid, _ = repo.save_blob(BlobType.DATA, b"v\n")
    tree = _save_tree(repo, [Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=_save_tree(
        repo, [Node(name=b"f", type=NodeType.FILE, mode=0o644, size=2, content=[Full(bid, 2)])]))])
    repo.flush()
    repo.save_snapshot(Snapshot(time="2026-01-01T00:00:00Z", time_ns=1, hostname="h", paths=["/src"],
                                source_id="h:/src", tree=tree, kind='files"><b id="injected">k</b>'))
    page = render_html(build_report(repo, ReportOptions()))
    body = re.sub(r"<script type='application/json' id='report-data'>.*?</script>", "", page, flags=re.S)
    assert 'id="injected"' not in body and "<b " not in body


def test_report_where_the_bytes_went_on_a_deep_tree_and_many_files(make_repo) -> None:  # type: ignore[no-untyped-def]
    """'Where the bytes went' summed each directory into every ancestor by joining every
    prefix again: cubic in the depth (a source 3,000 deep with a file at each level: about
    35 s; 10,000 deep: some 20 minutes). And it kept every new file to sort them for the
    20 largest (a first snapshot: every file of the source). Totals now flow up deepest
    first; the largest are kept in a heap of 20. Same tables as before."""
    from deltavault.maintenance.report.where import TOP, where_bytes

    repo = make_repo()
    depth = 3000
    tid = _save_tree(repo, [])
    for i in range(depth):
        data = os.urandom(1 + i % 7)
        bid, _ = repo.save_blob(BlobType.DATA, data)
        nodes = [Node(name=b"d", type=NodeType.DIR, mode=0o755, subtree=tid),
                 Node(name=b"f", type=NodeType.FILE, mode=0o644, size=len(data), content=[Full(bid, len(data))])]
        # a flat directory of many files beside the chain, at one level
        if i == depth // 2:
            for j in range(300):
                blob = os.urandom(10 + j % 50)
                b2, _ = repo.save_blob(BlobType.DATA, blob)
                nodes.append(Node(name=b"m%03d" % j, type=NodeType.FILE, mode=0o644, size=len(blob),
                                  content=[Full(b2, len(blob))]))
        tid = _save_tree(repo, nodes)
    root = _save_tree(repo, [Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=tid)])
    repo.flush()
    # No time bound, as in every test (the cubic version took about 35 s at this depth):
    # a return to it shows as this test's run time, not as a failure.
    wb = where_bytes(repo, "h:/src", None, ("s1", root))
    assert wb.files_new == depth + 300 and len(wb.largest) == TOP
    ranked = sorted(wb.largest, key=lambda f: (-f.bytes_added, -f.size, f.path))
    assert wb.largest == ranked and all(f.path.rpartition("/")[2].startswith("m") for f in wb.largest)
    top = {d.path: d for d in wb.directories}
    assert top, wb.directories
    src_total = sum(d.bytes_own for d in wb.directories if d.path == "src")
    assert all(d.bytes_total >= d.bytes_own for d in wb.directories) and src_total >= 0


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (scripts/install-system-deps.sh)")
def test_report_data_block_reads_back_in_a_browser_whatever_the_names(make_repo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The JSON block escaped only '</'. A host name holding '<!--<script>' puts the
    browser's script parser in its double-escaped state, where the page's own '</script>'
    no longer ends the block: the rest of the page was read as data and the report's JSON
    no longer parsed. Every '<' is now written as \\u003c."""
    from deltavault.maintenance.report.build import build_report
    from deltavault.maintenance.report.page import render_html
    from deltavault.maintenance.report.select import ReportOptions

    repo = make_repo()
    bid, _ = repo.save_blob(BlobType.DATA, b"v\n")
    tree = _save_tree(repo, [Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=_save_tree(
        repo, [Node(name=b"f", type=NodeType.FILE, mode=0o644, size=2, content=[Full(bid, 2)])]))])
    repo.flush()
    host = "h<!--<script>x"
    repo.save_snapshot(Snapshot(time="2026-01-01T00:00:00Z", time_ns=1, hostname=host, paths=["/src"],
                                source_id="h:/src", tree=tree))
    page = tmp_path / "r.html"
    page.write_text(render_html(build_report(repo, ReportOptions())))
    with Browser() as b:
        b.load(page.as_uri())
        got = b.evaluate("""(() => { try {
            return JSON.parse(document.getElementById('report-data').textContent).sources[0].hostname;
          } catch (e) { return 'unparsable: ' + e; } })()""")
    assert got == host


def test_snapshot_strings_reach_the_terminal_escaped(cli: Cli, tmp_path: Path) -> None:
    """A source path from --files-from (any user names the files listed), a host name and a
    tag are stored as given. ``snapshots`` and ``find`` printed them raw, so a name with an
    escape sequence retitled or rewrote the terminal of whoever listed the repository; they
    are shown as ``ls`` shows names (escaped), and exact in --json."""
    assert cli("init").returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    evil = "evil-\x1b]0;pwned\x07\x1b[2J\u202egnp.exe"
    (src / evil).write_bytes(b"x")
    lst = tmp_path / "list"
    lst.write_bytes(os.fsencode(src / evil) + b"\0")
    host = "h\x1b[31mred"
    tag = "t\x1b[1A\u202e"
    assert cli("backup", "--files-from-raw", str(lst), "--host", host, "--tag", tag).returncode == 0
    for args in (["snapshots"], ["find", "evil-*"]):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        assert _raw_controls(r.stdout) == [], (args, r.stdout)
        assert "evil-" in r.stdout
    j = cli("--json", "snapshots").last("snapshot")
    assert j["hostname"] == host and j["tags"] == [tag] and j["paths"] == [str(src / evil)]
