#!/usr/bin/env python3
"""deltavault report on 1,000 snapshots: CPU time and page size (docs/benchmarks.md, issue #15).

The repository is built through the real engines and Repository code, on small synthetic
sources so that it takes a few minutes: two file trees (375 runs each: a few files changed
and one added per run) and two volumes (125 runs each: a 1 GiB sparse image in 1 MiB
blocks, 1,024 heatmap regions, a few 64 KiB writes per run; the image holds no file system,
so every run falls back to block digests), opened afresh for every run as the CLI would.
Plus 10 failed runs and a check. Then ``deltavault report`` runs as a child process,
``--repeat`` times, with a retention policy; its CPU time (user + system, from
``RUSAGE_CHILDREN``: interpreter start, imports, reading, charts, writing) and the page's
size are reported, and the same in-process split into gathering and drawing.

Also, with ``--datasets``, the picture for the docs: disk-v1.img then disk-v2.img of the
shared datasets, staged at one path (``cp --sparse=always``, as bench/volume.py does),
backed up and reported, the page screenshotted by headless Chromium.

    flock /tmp/dv-bench.lock .venv/bin/python bench/report.py [--work DIR] [--snapshots 1000]
        [--repeat 3] [--datasets ../data/ds --screenshot docs/report-volume.png]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from deltavault.backends.local import LocalBackend  # noqa: E402
from deltavault.backup.files.options import FileBackupOptions  # noqa: E402
from deltavault.backup.files.run import BackupRequest, run_backup  # noqa: E402
from deltavault.backup.volume.options import VolumeOptions, VolumeRequest, default_source_id  # noqa: E402
from deltavault.backup.volume.run import run_volume_backup  # noqa: E402
from deltavault.errors import DeltavaultError  # noqa: E402
from deltavault.maintenance.check import check_record, check_repository  # noqa: E402
from deltavault.repository.repository import Repository  # noqa: E402

PASSWORD = b"bench"
SCRYPT = (2**10, 8, 1)
MiB = 1 << 20
LIMIT_CPU, LIMIT_BYTES = 3.0, 5 << 20


def opened(repo_dir: Path, cache: Path) -> Repository:
    return Repository.open(LocalBackend(repo_dir, fsync=False), lambda: PASSWORD, cache_root=cache)


def tree(root: Path, rnd: random.Random, files: int) -> None:
    for i in range(files):
        p = root / f"d{i % 12}" / f"s{i % 5}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rnd.randbytes(rnd.randrange(1_000, 60_000)))


def build(work: Path, snapshots: int) -> tuple[Path, Path]:
    """The repository of ``snapshots`` snapshots (3/4 files, 1/4 volume runs)."""
    repo_dir, cache = work / "repo", work / "cache"
    stamp = work / f"built-{snapshots}-v2"
    if stamp.exists():
        return repo_dir, cache
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    Repository.init(LocalBackend(repo_dir, fsync=False), PASSWORD, scrypt=SCRYPT, cache_root=cache)
    rnd = random.Random(15)
    trees = [work / "src-a", work / "src-b"]
    for t in trees:
        tree(t, rnd, 200)
    images = [work / "vol-a.img", work / "vol-b.img"]
    for img in images:
        with open(img, "wb") as f:
            f.truncate(1 << 30)
    volume_runs = snapshots // 4
    plan = ["v" if i % 4 == 3 and volume_runs else "f" for i in range(snapshots)]
    t0 = time.monotonic()
    done = {"f": 0, "v": 0}  # runs of each kind so far: sources take turns
    for i, what in enumerate(plan):
        repo = opened(repo_dir, cache)
        turn = done[what] % 2
        done[what] += 1
        if what == "f":
            src = trees[turn]
            for _ in range(4):
                victim = rnd.choice(sorted(src.rglob("*.bin")))
                victim.write_bytes(rnd.randbytes(rnd.randrange(1_000, 60_000)))
            (src / "new" / f"r{i}").mkdir(parents=True, exist_ok=True)
            (src / "new" / f"r{i}" / "added.bin").write_bytes(rnd.randbytes(rnd.randrange(10_000, 300_000)))
            time.sleep(0.01)
            run_backup(repo, BackupRequest(paths=[str(src)], options=FileBackupOptions(racy_window_ns=5_000_000)))
        else:
            img = images[turn]
            with open(img, "r+b") as f:
                hot = rnd.randrange(1024)
                for _ in range(rnd.randrange(2, 8)):
                    block = hot + rnd.randrange(-40, 40) if rnd.random() < 0.7 else rnd.randrange(1024)
                    f.seek(max(0, min(1023, block)) * MiB + rnd.randrange(0, MiB - 65536))
                    f.write(rnd.randbytes(65536))
            run_volume_backup(repo, VolumeRequest(str(img), options=VolumeOptions(block_size=MiB)))
        if i % 100 == 99:
            try:  # a failed run now and then: a volume that went missing
                gone = VolumeRequest(str(work / "gone.img"))
                gone.source_id = default_source_id(gone.hostname, str(images[0]))  # as if vol-a had gone
                run_volume_backup(repo, gone)
            except DeltavaultError:
                pass
            print(f"  {i + 1} snapshots, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    repo = opened(repo_dir, cache)
    repo.save_status(check_record(check_repository(repo), read_data=False, start_ns=time.time_ns()))
    stamp.touch()
    return repo_dir, cache


def measure_cli(repo_dir: Path, cache: Path, out: Path, repeat: int) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env.update(DELTAVAULT_REPOSITORY=str(repo_dir), DELTAVAULT_PASSWORD=PASSWORD.decode(),
               DELTAVAULT_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "deltavault", "report", "--html", str(out), "--keep-last", "10",
           "--keep-hourly", "24", "--keep-daily", "7"]
    cpu, wall = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.monotonic()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall.append(time.monotonic() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            raise SystemExit(f"report failed ({p.returncode}): {p.stderr}")
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"cpu_s": round(statistics.median(cpu), 2), "cpu_s_all": [round(c, 2) for c in cpu],
            "wall_s": round(statistics.median(wall), 2), "html_bytes": out.stat().st_size}


def measure_inprocess(repo_dir: Path, cache: Path) -> dict[str, object]:
    """Gathering and drawing, apart (imports of matplotlib counted in drawing)."""
    from deltavault.maintenance.report.build import build_report
    from deltavault.maintenance.report.select import ReportOptions
    from deltavault.maintenance.retention import Policy

    repo = opened(repo_dir, cache)
    t = time.process_time()
    rep = build_report(repo, ReportOptions(policy=Policy(last=10, hourly=24, daily=7)))
    gathered = time.process_time() - t
    t = time.process_time()
    from deltavault.maintenance.report.page import render_html

    page = render_html(rep)
    drawn = time.process_time() - t
    return {"snapshots": rep.snapshots, "sources": len(rep.sources), "heatmap_regions": [h.regions for h in rep.heatmaps],
            "gather_cpu_s": round(gathered, 2), "draw_cpu_s": round(drawn, 2), "html_bytes": len(page.encode()),
            "json_bytes": len(json.dumps(__import__("dataclasses").asdict(rep)))}


def screenshot(datasets: Path, work: Path, png: Path) -> dict[str, object]:
    """disk-v1 then disk-v2 of the shared datasets, reported and photographed."""
    from tests.browser import Browser

    from deltavault.maintenance.report.build import build_report
    from deltavault.maintenance.report.page import render_html
    from deltavault.maintenance.report.select import ReportOptions

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    Repository.init(LocalBackend(work / "repo", fsync=False), PASSWORD, scrypt=SCRYPT, cache_root=work / "cache")
    staged = work / "disk.img"
    results = []
    for name in ("disk-v1.img", "disk-v2.img"):
        subprocess.run(["cp", "--sparse=always", str(datasets / name), str(staged)], check=True)
        repo = opened(work / "repo", work / "cache")
        r = run_volume_backup(repo, VolumeRequest(str(staged), logical="/srv/images/disk.img",
                                                  source_id="vm1:volume:/srv/images/disk.img"))
        results.append({"image": name, "change_source": r.report.change_source, "bytes_read": r.report.bytes_read,
                        "blocks_changed": r.report.blocks_changed})
    repo = opened(work / "repo", work / "cache")
    repo.save_status(check_record(check_repository(repo), read_data=False, start_ns=time.time_ns()))
    page = work / "report.html"
    page.write_text(render_html(build_report(repo, ReportOptions())))
    with Browser(width=1180, height=900) as b:
        requests = b.load(page.as_uri())
        assert [u for u in requests if not u.startswith("data:")] == [page.as_uri()], requests
        b.evaluate("document.getElementById('where').remove()")  # no files snapshot here: an empty section
        top = b.evaluate("document.getElementById('heatmap').getBoundingClientRect().top + window.scrollY")
        height = b.evaluate("document.getElementById('heatmap').getBoundingClientRect().height")
        b.call("Emulation.setDeviceMetricsOverride", {"width": 1180, "height": 900, "deviceScaleFactor": 1,
                                                       "mobile": False}, session=True)
        import base64

        shot = b.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                 "clip": {"x": 0, "y": top - 10, "width": 1180,
                                                          "height": height + 20, "scale": 1}}, session=True)
        png.write_bytes(base64.b64decode(shot["data"]))
        b.screenshot(work / "full.png")
    return {"runs": results, "png": str(png), "page": str(page)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dv-bench-report"))
    ap.add_argument("--snapshots", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "report.json")
    ap.add_argument("--datasets", type=Path, help="also photograph the report of disk-v1 -> disk-v2 found here")
    ap.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "report-volume.png")
    ap.add_argument("--skip-bench", action="store_true", help="only the screenshot")
    a = ap.parse_args()
    result: dict[str, object] = {}
    if not a.skip_bench:
        repo_dir, cache = build(a.work, a.snapshots)
        result["cli"] = measure_cli(repo_dir, cache, a.work / "report.html", a.repeat)
        result["in_process"] = measure_inprocess(repo_dir, cache)
        cli = result["cli"]
        assert isinstance(cli, dict)
        result["within_limits"] = cli["cpu_s"] < LIMIT_CPU and cli["html_bytes"] < LIMIT_BYTES
    if a.datasets:
        result["screenshot"] = screenshot(a.datasets, a.work / "datasets", a.screenshot)
    text = json.dumps(result, indent=1)
    print(text)
    if not a.skip_bench:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
