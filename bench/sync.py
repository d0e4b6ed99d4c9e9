#!/usr/bin/env python3
"""Benchmark `deltavault sync` against rsync on the shared datasets, in the same run.

    .venv/bin/python bench/sync.py --datasets /work/data/ds --out bench/out/sync.json \
        [--repeat 3] [--update-doc docs/benchmarks.md]

Scenarios (as /work/shared/bench/anchors.sh stages them, source on the work directory's
file system, a warm page cache):
  full  first mirror of tree-v1 + db-v1.sqlite      rsync -a            vs deltavault sync
  incr  after staging v2 (unchanged files keep their inodes)
                                                    rsync -a --delete --inplace --no-whole-file
                                                                        vs deltavault sync --delete
Both tools write to the same fresh XFS file system on a loop device (reflink=1, as mkfs.xfs
makes it), so neither pays for another's leftovers; deltavault's delta uses its reflink
clones. Bytes written are read from the loop device's counters around each run plus a sync.
Takes /tmp/dv-bench.lock so only one benchmark runs at a time. Needs root (loop devices).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PAGE = 4096
MB = 1e6
SETTLE_S = 2.0


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def stage(ds: Path, src: Path, version: str) -> None:
    """Exactly as anchors.sh: an upgrade keeps the inodes of unchanged files."""
    (src / "tree").mkdir(parents=True, exist_ok=True)
    sh("rsync", "-a", "--delete", f"{ds}/tree-{version}/", f"{src}/tree/")
    sh("rsync", "-a", "--inplace", "--no-whole-file", f"{ds}/db-{version}.sqlite", f"{src}/db.sqlite")
    warm(src)


def warm(path: Path) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                with open(p, "rb") as fh:
                    while fh.read(8 << 20):
                        pass


def changed_bytes(ds: Path) -> dict[str, int]:
    """Ground truth: bytes of tree files whose content is new in v2, and changed db pages."""
    def digest(p: Path) -> bytes:
        return hashlib.blake2b(p.read_bytes(), digest_size=16).digest()

    tree = 0
    files = 0
    v1, v2 = ds / "tree-v1", ds / "tree-v2"
    for dirpath, _dirs, names in os.walk(v2):
        for n in names:
            p2 = Path(dirpath) / n
            if p2.is_symlink() or not p2.is_file():
                continue
            p1 = v1 / p2.relative_to(v2)
            if not p1.is_file() or p1.is_symlink() or p1.stat().st_size != p2.stat().st_size or digest(p1) != digest(p2):
                tree += p2.stat().st_size
                files += 1
    pages = 0
    with open(ds / "db-v1.sqlite", "rb") as a, open(ds / "db-v2.sqlite", "rb") as b:
        while True:
            x, y = a.read(8 << 20), b.read(8 << 20)
            if not x and not y:
                break
            if x != y:
                pages += sum(1 for i in range(0, max(len(x), len(y)), PAGE) if x[i:i + PAGE] != y[i:i + PAGE])
    return {"tree_bytes": tree, "tree_files": files, "db_pages": pages, "db_bytes": pages * PAGE,
            "total": tree + pages * PAGE}


class Loop:
    def __init__(self, work: Path, size_gb: int) -> None:
        self.img = work / "dst-xfs.img"
        self.mnt = work / "dst"
        with open(self.img, "wb") as f:
            # Allocated up front, like a real disk: a sparse image makes every first write
            # through the loop device allocate in the backing file system too.
            os.posix_fallocate(f.fileno(), 0, size_gb << 30)
        sh("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(self.img))
        # Direct I/O to the image: a real disk has no second page cache under the file system's.
        self.dev = sh("losetup", "-f", "--show", "--direct-io=on", str(self.img)).strip()
        self.mnt.mkdir(exist_ok=True)
        sh("mount", self.dev, str(self.mnt))

    def remount(self) -> None:
        """Empty the targets' page cache, so that every run starts with the same free memory.
        On this VM, writing into memory the kernel has not used for a while is several times
        slower than reusing recent pages (the host backs guest memory lazily): without this,
        whichever run comes later in the sequence is slower, whatever the tool."""
        sh("umount", str(self.mnt))
        sh("mount", self.dev, str(self.mnt))

    def sectors_written(self) -> int:
        return int(Path(f"/sys/block/{os.path.basename(self.dev)}/stat").read_text().split()[6])

    def close(self) -> None:
        for _ in range(20):
            if subprocess.run(["umount", str(self.mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        sh("losetup", "-d", self.dev, check=False)
        self.img.unlink(missing_ok=True)


def settle() -> None:
    """Flush and let the file systems' background work (XFS frees deleted inodes in the
    background) finish, so that it is not billed to the next timed run."""
    os.sync()
    time.sleep(SETTLE_S)
    os.sync()


def timed(loop: Loop, argv: list[str]) -> dict[str, float | int | dict]:
    loop.remount()
    settle()
    before = loop.sectors_written()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    os.sync()
    out: dict[str, float | int | dict] = {"seconds": round(seconds, 3),
                                          "cpu_user": round(ru1.ru_utime - ru0.ru_utime, 3),
                                          "cpu_sys": round(ru1.ru_stime - ru0.ru_stime, 3),
                                          "device_bytes": (loop.sectors_written() - before) * 512}
    summaries = [json.loads(x) for x in p.stdout.splitlines() if x.startswith('{"type": "summary"')]
    if summaries:
        s = summaries[-1]
        out["summary"] = {k: s[k] for k in ("bytes_written", "bytes_copied", "delta_bytes_written",
                                            "delta_file_bytes", "files_new", "files_updated", "files_delta",
                                            "files_same", "deleted", "errors")}
    return out


def rsync_full(src: Path, dst: Path) -> list[str]:
    return ["rsync", "-a", f"{src}/", f"{dst}/"]


def rsync_incr(src: Path, dst: Path) -> list[str]:
    return ["rsync", "-a", "--delete", "--inplace", "--no-whole-file", f"{src}/", f"{dst}/"]


def dv_sync(src: Path, dst: Path, *extra: str) -> list[str]:
    return [PY, "-m", "deltavault", "--json", "sync", *extra, str(src), str(dst)]


def same_tree(src: Path, dst: Path) -> bool:
    return sh("rsync", "-n", "-i", "-a", "--checksum", "--delete", f"{src}/", f"{dst}/").strip() == ""


def run(args: argparse.Namespace) -> dict:
    ds = Path(args.datasets).resolve()
    work = Path(args.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    src = work / "src"
    loop = Loop(work, args.dst_gb)
    res: dict = {"datasets": str(ds), "repeat": args.repeat, "host_cpus": os.cpu_count(),
                 "dst_fs": "xfs (reflink=1) on a loop device", "src_fs": sh("findmnt", "-no", "FSTYPE", "-T", str(work)).strip(),
                 "full": {"rsync": [], "deltavault": []}, "incr": {"rsync": [], "deltavault": []}}
    try:
        res["changed"] = changed_bytes(ds)
        for rep in range(args.repeat):
            for tool in ("rsync", "deltavault"):
                if (loop.mnt / tool).exists():
                    shutil.rmtree(loop.mnt / tool)
            stage(ds, src, "v1")
            for tool in ("rsync", "deltavault") if rep % 2 == 0 else ("deltavault", "rsync"):
                dst = loop.mnt / tool
                argv = rsync_full(src, dst) if tool == "rsync" else dv_sync(src, dst)
                res["full"][tool].append(timed(loop, argv))
                if not same_tree(src, dst):
                    raise SystemExit(f"{tool} full sync left differences")
            stage(ds, src, "v2")
            for tool in ("rsync", "deltavault") if rep % 2 == 0 else ("deltavault", "rsync"):
                dst = loop.mnt / tool
                argv = rsync_incr(src, dst) if tool == "rsync" else dv_sync(src, dst, "--delete")
                res["incr"][tool].append(timed(loop, argv))
                if not same_tree(src, dst):
                    raise SystemExit(f"{tool} incremental sync left differences")
            print(f"rep {rep + 1}: " + ", ".join(
                f"{sc} {tool} {res[sc][tool][-1]['seconds']:.2f}s (cpu {res[sc][tool][-1]['cpu_user']:.2f}u"
                f"+{res[sc][tool][-1]['cpu_sys']:.2f}s)" for sc in ("full", "incr")
                for tool in ("rsync", "deltavault")), flush=True)
    finally:
        loop.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for sc in ("full", "incr"):
        r = statistics.median(x["seconds"] for x in res[sc]["rsync"])
        d = statistics.median(x["seconds"] for x in res[sc]["deltavault"])
        # Each repetition runs both tools back to back, so the paired ratio cancels most of the
        # shared machine's drift; its median is the headline figure.
        ratios = [round(a["seconds"] / b["seconds"], 3) for a, b in zip(res[sc]["deltavault"], res[sc]["rsync"])]
        res[f"{sc}_median"] = {"rsync_s": r, "deltavault_s": d, "ratio_of_medians": round(d / r, 3),
                               "ratios": ratios, "ratio": statistics.median(ratios)}
    dv_written = [x["summary"]["bytes_written"] for x in res["incr"]["deltavault"]]
    dv_dev = [x["device_bytes"] for x in res["incr"]["deltavault"]]
    rs_dev = [x["device_bytes"] for x in res["incr"]["rsync"]]
    ch = res["changed"]["total"]
    res["incr_written"] = {"changed_bytes": ch, "deltavault_written": statistics.median(dv_written),
                           "deltavault_written_ratio": round(statistics.median(dv_written) / ch, 3),
                           "deltavault_device_bytes": statistics.median(dv_dev),
                           "deltavault_device_ratio": round(statistics.median(dv_dev) / ch, 3),
                           "rsync_device_bytes": statistics.median(rs_dev),
                           "rsync_device_ratio": round(statistics.median(rs_dev) / ch, 3)}
    return res


def markdown(res: dict) -> str:
    f, i, w, c = res["full_median"], res["incr_median"], res["incr_written"], res["changed"]
    ok_full = "met" if f["ratio"] <= 0.7 else "NOT met"
    ok_time = "met" if i["ratio"] < 1.0 else "NOT met"
    ok_bytes = "met" if w["deltavault_written_ratio"] <= 1.2 else "NOT met"
    return f"""## Sync

`deltavault sync` against rsync, measured in the same run by `bench/sync.py` ({res['repeat']} repetitions,
each running both tools back to back in alternating order; seconds are medians, the ratio is the
median of the per-repetition ratios; source on {res['src_fs']}, both targets on one {res['dst_fs']}; {res['host_cpus']} CPUs,
warm page cache). Reproduce: `.venv/bin/python bench/sync.py --datasets /work/data/ds --out bench/out/sync.json
--update-doc docs/benchmarks.md` (needs root; takes /tmp/dv-bench.lock).

| scenario | rsync | deltavault | ratio | target |
|---|---|---|---|---|
| first sync, tree-v1 + db-v1 (`rsync -a`) | {f['rsync_s']:.2f} s | {f['deltavault_s']:.2f} s | {f['ratio']:.2f} (runs: {', '.join(map(str, f['ratios']))}; of medians: {f['ratio_of_medians']:.2f}) | ≤ 0.70: {ok_full} |
| re-sync v1 → v2 (`rsync -a --delete --inplace --no-whole-file`) | {i['rsync_s']:.2f} s | {i['deltavault_s']:.2f} s | {i['ratio']:.2f} (runs: {', '.join(map(str, i['ratios']))}; of medians: {i['ratio_of_medians']:.2f}) | < 1.0: {ok_time} |

Bytes written by the re-sync, against the changed bytes ({c['tree_files']} tree files with new content,
{c['tree_bytes'] / MB:.0f} MB, plus {c['db_pages']} changed 4 KiB database pages, {c['db_bytes'] / MB:.0f} MB;
{w['changed_bytes'] / MB:.0f} MB in all):

| | bytes | times the changed bytes | target |
|---|---|---|---|
| deltavault, file data written (its summary) | {w['deltavault_written'] / MB:.0f} MB | {w['deltavault_written_ratio']:.2f} | ≤ 1.2: {ok_bytes} |
| deltavault, written to the device (incl. file system metadata) | {w['deltavault_device_bytes'] / MB:.0f} MB | {w['deltavault_device_ratio']:.2f} | |
| rsync, written to the device | {w['rsync_device_bytes'] / MB:.0f} MB | {w['rsync_device_ratio']:.2f} | |

The database's changed pages are found by comparing the two versions page by page and are written
into a reflink clone of the old file, which is then renamed over it; see docs/sync.md for why 4 KiB
pages and not FastCDC chunks. {res.get('note', '')}
"""


def update_doc(path: Path, section: str) -> None:
    """Replace the '## Sync' section (up to the next '## ' heading), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.split("\n")
    if "## Sync" not in lines:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    i = lines.index("## Sync")
    j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    new = [*lines[:i], *section.rstrip("\n").split("\n"), "", *lines[j:]]
    path.write_text("\n".join(new).rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="/work/data/ds")
    ap.add_argument("--out", default=str(ROOT / "bench/out/sync.json"))
    ap.add_argument("--work", default="/var/tmp/dv-bench-sync")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dst-gb", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--update-doc", metavar="MD", help="replace the '## Sync' section of this file")
    ap.add_argument("--from-json", metavar="JSON", help="only re-render a saved result")
    ap.add_argument("--note", default="", help="a sentence about the conditions, added to the section")
    args = ap.parse_args()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        for sc in ("full", "incr"):  # results saved before the paired ratio was the headline
            m = res[f"{sc}_median"]
            if "ratio_of_medians" not in m:
                m["ratio_of_medians"], m["ratio"] = m["ratio"], statistics.median(m["ratios"])
        res["note"] = args.note or res.get("note", "")
        md = markdown(res)
        print(md)
        if args.update_doc:
            update_doc(Path(args.update_doc), md)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench/sync.py needs root (it mounts an XFS loop device for the targets)")
    with open("/tmp/dv-bench.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = run(args)
    res["note"] = args.note
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    md = markdown(res)
    print(md)
    if args.update_doc:
        update_doc(Path(args.update_doc), md)


if __name__ == "__main__":
    main()
