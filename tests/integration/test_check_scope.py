"""What `check` says it read. ``--read-headers --read-data`` printed "0 pack header(s) read":
the data pass compares the header of every pack it reads, so none is read alone, yet every
header was checked. A ``--read-data-subset`` check was recorded with ``read_data`` false and
nothing else, and the report called it "structure only"; with ``--read-data`` beside it, the
subset alone was read but the record said all data. Through the CLI on a local repository."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import Cli
from tests.integration.dayone.test_check_subset import _repo


def _last_check(cli: Cli, tmp_path: Path) -> str:
    """What the HTML report says of the last check (from its status record)."""
    page = tmp_path / "report.html"
    page.unlink(missing_ok=True)
    r = cli("report", "--html", str(page))
    assert r.returncode == 0, r.stderr
    m = re.search(r"<p id='last-check'[^>]*>(.*?)</p>", page.read_text())
    assert m, page.read_text()[:2000]
    return m.group(1)


def test_headers_checked_with_the_data_are_counted(tmp_path: Path, cli: Cli) -> None:
    packs = _repo(tmp_path, cli)
    r = cli("check", "--read-headers", "--read-data")
    assert r.returncode == 0 and f"{packs} pack header(s) checked ({packs} with their data)" in r.stdout, r.stdout
    assert "0 pack header(s)" not in r.stdout
    s = cli("--json", "check", "--read-headers", "--read-data").last("check_summary")
    assert (s["headers_checked"], s["headers_read"], s["packs_read"]) == (packs, 0, packs)
    assert (s["read_data"], s["read_data_subset"]) == (True, None)
    # a subset: the packs it reads are checked with their data, the others' headers read alone
    s = cli("--json", "check", "--read-headers", "--read-data-subset", "1/2").last("check_summary")
    assert s["headers_checked"] == packs and s["headers_read"] == packs - s["packs_read"] > 0
    r = cli("check", "--read-headers", "--read-data-subset", "1/2")
    want = f"{packs} pack header(s) checked ({s['packs_read']} with their data, {s['headers_read']} read alone)"
    assert want in r.stdout, r.stdout
    # headers alone, as before
    s = cli("--json", "check", "--read-headers").last("check_summary")
    assert (s["headers_checked"], s["headers_read"], s["read_data"]) == (packs, packs, False)
    assert f"{packs} pack header(s) read" in cli("check", "--read-headers").stdout


def test_a_subset_is_recorded_as_a_subset(tmp_path: Path, cli: Cli) -> None:
    packs = _repo(tmp_path, cli)
    assert cli("check").returncode == 0
    assert "structure only" in _last_check(cli, tmp_path)
    s = cli("--json", "check", "--read-data-subset", "1/1").last("check_summary")
    said = _last_check(cli, tmp_path)
    assert "reading data subset 1/1" in said and f"in {packs} pack(s) of subset 1/1" in said, said
    assert (s["read_data"], s["read_data_subset"], s["packs_read"]) == (False, "1/1", packs)
    # --read-data beside a subset: only the subset is read, and said so
    r = cli("--json", "check", "--read-data", "--read-data-subset", "50%")
    assert r.returncode == 0 and "--read-data is ignored" in r.last("warning")["message"], r.stdout
    s = r.last("check_summary")
    assert (s["read_data"], s["read_data_subset"]) == (False, "50%") and s["packs_read"] < packs
    assert "reading data subset 50%" in _last_check(cli, tmp_path)
    s = cli("--json", "check", "--read-data").last("check_summary")
    assert (s["read_data"], s["read_data_subset"], s["packs_read"]) == (True, None, packs)
    assert "reading all data" in _last_check(cli, tmp_path)
