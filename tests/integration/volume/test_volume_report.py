"""The report of a real repository, rendered by headless Chromium: a partitioned disk backed
up three times (the third falls back: a partition was re-created), a files source, a failed
run and a check. Checked from the rendered page: every section is there, the heatmap has one
region per block with exactly the changed ones coloured, and nothing came from the network."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import struct
from pathlib import Path

import pytest
from PIL import Image

from deltavault.backup.files.options import FileBackupOptions
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.errors import UsageError
from deltavault.maintenance.check import check_record, check_repository
from deltavault.maintenance.report.build import build_report
from deltavault.maintenance.report.charts import CHANGED
from deltavault.maintenance.report.page import render_html
from deltavault.maintenance.report.select import ReportOptions
from deltavault.maintenance.retention import Policy
from tests.browser import CHROMIUM, Browser
from tests.conftest import needs_root, needs_tools
from tests.integration.volume.conftest import Vol, fill_tree, loop, mounted, run

pytestmark = [needs_root(), needs_tools("sfdisk", "losetup", "mkfs.ext4"), pytest.mark.root,
              pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (scripts/install-system-deps.sh)")]
MiB = 1 << 20
BLOCKS = 64  # a 64 MiB disk in 1 MiB blocks: 64 regions
UNCHANGED = "rgb(236, 236, 236)"  # charts.UNCHANGED, as the browser computes it

FACTS = """(() => {
  const section = id => { const s = document.getElementById(id);
    return s && {title: s.querySelector('h2').textContent, charts: s.querySelectorAll('svg.chart').length,
                 height: s.getBoundingClientRect().height}; };
  const regions = [...document.querySelectorAll('#heatmap g[id^="hm0-region-"]')].map(g => ({
    id: g.id, fill: getComputedStyle(g.querySelector('path')).fill, title: g.querySelector('title').textContent}));
  const rows = [...document.querySelectorAll('#timeline tr[data-status]')].map(tr => ({
    status: tr.dataset.status, snapshot: tr.dataset.snapshot, cls: tr.className, text: tr.innerText}));
  const charts = [...document.querySelectorAll('svg.chart')].map(s => s.getBoundingClientRect().height);
  return {sections: Object.fromEntries(['timeline', 'heatmap', 'where', 'health'].map(id => [id, section(id)])),
          regions, rows, charts,
          heatmapText: document.getElementById('heatmap').innerText,
          heatmapSvgText: [...document.querySelectorAll('#heatmap svg text')].map(t => t.textContent).join(' | '),
          perRun: document.querySelector('#heatmap svg[aria-label^="blocks read and changed per run"] image')
                    .getAttribute('xlink:href'),
          whereText: document.getElementById('where').innerText,
          check: document.getElementById('last-check').dataset.result,
          retention: {...document.getElementById('retention').dataset},
          data: JSON.parse(document.getElementById('report-data').textContent).snapshots};
})()"""


def partitions(img: Path) -> list[tuple[int, int]]:
    table = json.loads(run("sfdisk", "-J", str(img)))["partitiontable"]
    return [(p["start"] * 512, p["size"] * 512) for p in table["partitions"]]


def make_disk(tmp: Path) -> Path:
    img = tmp / "disk.img"
    with open(img, "wb") as f:
        f.truncate(BLOCKS * MiB)
    script = "label: gpt\\nstart=2048, size=49152, type=L\\nstart=65536, size=49152, type=L\\n"
    run("sh", "-c", f"printf '{script}' | sfdisk -q {img}")
    for off, size in partitions(img):
        with loop(img, off, size) as dev:
            run("mkfs.ext4", "-q", "-F", dev)
    return img


def on_partition(img: Path, n: int, tmp: Path, fn) -> None:  # type: ignore[no-untyped-def]
    off, size = partitions(img)[n]
    with loop(img, off, size) as dev, mounted(dev, tmp / f"mnt{n}") as mnt:
        fn(mnt)


def changed_blocks(a: Path, b: Path) -> set[int]:
    """Blocks whose bytes differ between two restored images: the oracle for the heatmap."""
    out = set()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for i in range(BLOCKS):
            if fa.read(MiB) != fb.read(MiB):
                out.add(i)
    return out


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_report_renders_in_chromium_with_no_network(vol: Vol, tmp_path: Path) -> None:
    img = make_disk(tmp_path)
    on_partition(img, 0, tmp_path, lambda m: fill_tree(m / "data", seed=1, files=12, max_size=200_000))
    on_partition(img, 1, tmp_path, lambda m: fill_tree(m / "docs", seed=2, files=12, max_size=200_000))
    r1 = vol.backup(img)
    on_partition(img, 0, tmp_path, lambda m: (m / "data" / "d1" / "f1.bin").write_bytes(os.urandom(150_000)))
    r2 = vol.backup(img)
    assert r2.report.change_source == "fs-digests", r2.report.rejected
    off, size = partitions(img)[1]
    with loop(img, off, size) as dev:  # a new file system on partition 2: its digests vouch for nothing
        run("mkfs.ext4", "-q", "-F", dev)
    r3 = vol.backup(img)
    assert r3.report.change_source == "block-digests"
    assert any("re-created" in x["reason"] for x in r3.report.rejected), r3.report.rejected
    images = [vol.restore(r.snapshot_id) for r in (r1, r2, r3)]
    expected = [0] * BLOCKS
    for a, b in itertools.pairwise(images):
        for blk in changed_blocks(a, b):
            expected[blk] += 1
    assert any(c == 1 for c in expected) and any(c == 0 for c in expected)

    src = tmp_path / "src"
    fill_tree(src / "photos", seed=3, files=6)
    opts = FileBackupOptions(racy_window_ns=50_000_000)
    run_backup(vol.repo, BackupRequest(paths=[str(src)], options=opts))
    fill_tree(src / "photos" / "new", seed=4, files=4, max_size=600_000)
    run_backup(vol.repo, BackupRequest(paths=[str(src)], options=opts))
    with pytest.raises(UsageError):
        vol.backup(tmp_path / "missing.img")  # a failed run of the same source
    vol.repo.save_status(check_record(check_repository(vol.repo), read_data=False, start_ns=0))
    page = tmp_path / "report.html"
    page.write_text(render_html(build_report(vol.repo, ReportOptions(policy=Policy(last=2)))))

    with Browser() as browser:
        url = page.as_uri()
        requests = browser.load(url)
        # the page itself and the images inlined in it (data: URLs), nothing else
        assert [u for u in requests if not u.startswith("data:image/png;base64,")] == [url], requests
        facts = browser.evaluate(FACTS)
        shot = browser.screenshot(tmp_path / "report.png")
        # the recorder does see what a page fetches: a page that reaches out is caught
        probe = tmp_path / "probe.html"
        probe.write_text('<img src="http://127.0.0.1:9/x.png"><link rel="stylesheet" href="https://example.invalid/a.css">')
        assert len(browser.load(probe.as_uri(), settle=0.5)) == 3

    for name, title in (("timeline", "Timeline"), ("heatmap", "Block changes"), ("where", "Where the bytes went"),
                        ("health", "Repository health")):
        sec = facts["sections"][name]
        assert sec is not None and sec["title"] == title and sec["charts"] >= 1 and sec["height"] > 200, (name, sec)
    assert all(h > 50 for h in facts["charts"]), facts["charts"]  # every chart drew at a real size
    # the heatmap: one region per block, coloured exactly where runs changed it, darker for more
    regions = facts["regions"]
    assert [r["id"] for r in regions] == [f"hm0-region-{i}" for i in range(BLOCKS)]
    assert [i for i, r in enumerate(regions) if r["fill"] != UNCHANGED] == [i for i, c in enumerate(expected) if c]
    fills: dict[int, set[str]] = {}
    for r, c in zip(regions, expected):
        fills.setdefault(c, set()).add(r["fill"])
    assert all(len(f) == 1 for f in fills.values()) and len(fills) == len(set(expected)), fills
    assert regions[40]["title"].startswith(f"region 40: bytes {40 * MiB:,}-{41 * MiB - 1:,}")
    assert "partition 2 ext4" in regions[40]["title"]
    assert "partition 1: ext4" in facts["heatmapSvgText"] and "partition 2: ext4" in facts["heatmapSvgText"]
    # blocks read against changed, one row per run: an image of runs x regions, changed ones red
    rows_img = Image.open(io.BytesIO(base64.b64decode(facts["perRun"].split(",", 1)[1]))).convert("RGB")
    assert rows_img.size == (BLOCKS, 3)
    changed_rgb = tuple(int(CHANGED[i:i + 2], 16) for i in (1, 3, 5))
    first = [rows_img.getpixel((x, 0)) for x in range(BLOCKS)]  # a first run: what it read is new
    assert first.count(changed_rgb) == r1.snapshot.summary.blocks_read and len(set(first)) == 2
    for row, (a, b) in enumerate(itertools.pairwise(images), start=1):
        assert {x for x in range(BLOCKS) if rows_img.getpixel((x, row)) == changed_rgb} == changed_blocks(a, b)
    # the timeline: the fallback run and its reason, the failed run, the files runs
    rows = {r["snapshot"]: r for r in facts["rows"]}
    fallback = rows[r3.snapshot_id]
    assert fallback["cls"] == "fallback" and "re-created" in fallback["text"] and "block digests" in fallback["text"]
    assert "ext4" in rows[r2.snapshot_id]["text"]  # fs-digests on partitions
    failed = [r for r in facts["rows"] if r["status"] == "failed"]
    assert len(failed) == 1 and "does not exist" in failed[0]["text"]
    assert "photos/new" in facts["whereText"]
    assert facts["check"] == "ok" and facts["retention"] == {"keep": "4", "forget": "1"}
    assert facts["data"] == 5
    w, h = png_size(shot)
    assert w == 1280 and h > 3000 and len(shot) > 100_000  # the whole page, drawn
