#!/usr/bin/env python3
"""Volume backup benchmark: deltavault against the peers on the shared disk images.

image-full backs up disk-v1.img and image-incr then disk-v2.img, staged as anchors.sh does
(``cp --sparse=always`` to the same path); image-nochange backs up disk-v2.img once more. The volume runs use their own repository (the
peers' image runs share one with their file runs; ours would dedup against nothing there
anyway, a block is not a file chunk). Measured per run: wall time of the whole command,
bytes read from the source (as deltavault counts them), bytes added (growth of the
repository directory, as anchors.sh measures it), and the change source used.

Also: the budget of the metadata-digest incremental (1.5x the changed bytes plus the
metadata areas, computed from the images: see ``budget``), a restore of image-incr checked
against the image (sha256 with free space zeroed, and e2fsck -fn), a block-size sweep, and
the qemu dirty-bitmap path (disk-v1 as qcow2, the v1->v2 changes written through qemu-nbd).

Usage: bench/volume.py --datasets DIR [--work DIR] [--out FILE] [--repeat N] [--peers borg restic]
                       [--block-sizes 64K 256K 1M 4M] [--skip-qemu] [--skip-peers]
Run it under flock /tmp/dv-bench.lock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
MiB = 1 << 20


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True).stdout


def du(path: Path) -> int:
    return int(sh("du", "-sb", str(path)).split()[0]) if path.exists() else 0


def dv(work: Path, *args: str) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env.update(DELTAVAULT_PASSWORD="bench", DELTAVAULT_CACHE_DIR=str(work / "cache"))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "deltavault", "--json", *args], env=env,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"deltavault {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    summaries = [x for x in lines if x.get("type") == "summary"]
    return dt, (summaries or lines or [{}])[-1]


def changed_pages(a: Path, b: Path) -> int:
    """4 KiB pages that differ between two images (compared a MiB at a time first)."""
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if not x and not y:
                return n
            if x != y:
                n += sum(1 for i in range(0, max(len(x), len(y)), 4096) if x[i:i + 4096] != y[i:i + 4096])


def budget(img: Path, changed_bytes: int) -> dict:
    """Metadata areas of the image: every page in use that holds no file data (bitmaps,
    inode tables, journal, directories, extent blocks). Computed with the ext4 scanner by
    comparing the image's inode digests with themselves: then no file's data is read."""
    from deltavault.tracking.volume.ext4 import Ext4Scanner
    from deltavault.tracking.volume.readers import FileReader

    r = FileReader(str(img))
    try:
        s = Ext4Scanner(r)
        alloc = s.allocation().allocated
        meta = s.digest_scan(s.digest_scan(None).digests).must_read & alloc
    finally:
        r.close()
    return {"changed_bytes": changed_bytes, "metadata_bytes": len(meta) * 4096,
            "allocated_bytes": len(alloc) * 4096,
            "budget_bytes": int(1.5 * changed_bytes + len(meta) * 4096)}


def expected_sha(img: Path) -> str:
    """sha256 of the image with its wholly free pages as zeros (free ranges from dumpe2fs)."""
    out = sh("dumpe2fs", str(img))
    bs = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    free = []
    # Per-group lines are indented; the header's "Free blocks:" is a count, not a range.
    for m in re.finditer(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, (x.strip() for x in m.group(1).split(","))):
            a, _, b = part.partition("-")
            free.append((int(a) * bs, (int(b or a) + 1) * bs))
    free.sort()
    h = hashlib.sha256()
    pos = 0
    with open(img, "rb") as f:
        def copy(upto: int) -> None:
            nonlocal pos
            while pos < upto:
                chunk = f.read(min(8 * MiB, upto - pos))
                h.update(chunk)
                pos += len(chunk)
        for s, e in free:
            s, e = -(-s // 4096) * 4096, e // 4096 * 4096
            if e <= s:
                continue
            copy(s)
            f.seek(e)
            left = e - s
            while left:
                n = min(8 * MiB, left)
                h.update(bytes(n))
                left -= n
            pos = e
        copy(os.fstat(f.fileno()).st_size)
    return h.hexdigest()


def volume_pair(ds: Path, work: Path, *, block_size: str, cbt: str = "auto",
                check_restore: bool = False) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    (work / "img").mkdir(parents=True)
    (work / "t").mkdir()
    repo = work / "t" / "repo"
    dv(work, "-r", str(repo), "init")
    img = work / "img" / "disk.img"
    out: dict = {}
    for scen, version in (("image-full", "v1"), ("image-incr", "v2"), ("image-nochange", None)):
        if version is not None:
            sh("cp", "--sparse=always", str(ds / f"disk-{version}.img"), str(img))
        before = du(work / "t")
        sh("sync")
        secs, s = dv(work, "-r", str(repo), "backup", "--volume", str(img), "--block-size", block_size,
                     "--cbt", cbt)
        out[scen] = {"seconds": round(secs, 2), "engine_seconds": s["seconds"],
                     "bytes_added": du(work / "t") - before, "bytes_read": s["bytes_read"],
                     "bytes_to_read": s["bytes_to_read"], "bytes_changed": s["bytes_changed"],
                     "bytes_free_skipped": s["bytes_free_skipped"], "change_source": s["change_source"],
                     "blocks_changed": s["blocks_changed"], "snapshot": s["snapshot"], "notes": s["notes"]}
    if check_restore:
        target = work / "restored.img"
        secs, s = dv(work, "-r", str(repo), "restore", "--volume", out["image-incr"]["snapshot"], str(target))
        e2 = subprocess.run(["e2fsck", "-fn", str(target)], capture_output=True, text=True)
        out["restore"] = {"seconds": round(secs, 2), "sha256_equal_free_zeroed": sha_file(target) == expected_sha(img),
                          "sha256_equal_source": sha_file(target) == sha_file(img),
                          "e2fsck_clean": e2.returncode == 0}
    shutil.rmtree(work, ignore_errors=True)
    return out


def sha_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(8 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def qemu_pair(ds: Path, work: Path, block_size: str) -> dict:
    """disk-v1 as qcow2; the v1->v2 changes written through qemu-nbd (tracked by the bitmap)."""
    from deltavault.tracking.volume import nbdlib

    nbd = nbdlib.load_nbd()
    shutil.rmtree(work, ignore_errors=True)
    (work / "t").mkdir(parents=True)
    repo = work / "t" / "repo"
    dv(work, "-r", str(repo), "init")
    img = work / "disk.qcow2"
    sh("qemu-img", "convert", "-O", "qcow2", str(ds / "disk-v1.img"), str(img))
    out: dict = {}
    secs, s = dv(work, "-r", str(repo), "backup", "--volume", str(img), "--block-size", block_size)
    out["qcow2-full"] = {"seconds": round(secs, 2), "bytes_read": s["bytes_read"], "change_source": s["change_source"]}
    sock = work / "rw.sock"
    proc = subprocess.Popen(["qemu-nbd", "-t", "-f", "qcow2", "-k", str(sock), str(img)])
    written = 0
    try:
        while not sock.exists():
            time.sleep(0.02)
        h = nbd.NBD()
        h.connect_unix(str(sock))
        with open(ds / "disk-v1.img", "rb") as fa, open(ds / "disk-v2.img", "rb") as fb:
            off = 0
            while True:
                x, y = fa.read(MiB), fb.read(MiB)
                if not y:
                    break
                if x != y:
                    for i in range(0, len(y), 4096):
                        if x[i:i + 4096] != y[i:i + 4096]:
                            h.pwrite(y[i:i + 4096], off + i)
                            written += 4096
                off += len(y)
        h.flush()
        h.shutdown()
    finally:
        proc.terminate()
        proc.wait(30)
    before = du(work / "t")
    sh("sync")
    secs, s = dv(work, "-r", str(repo), "backup", "--volume", str(img), "--block-size", block_size)
    out["qcow2-incr"] = {"seconds": round(secs, 2), "engine_seconds": s["seconds"], "bytes_written_by_guest": written,
                         "bytes_dirty": s["bytes_dirty"], "bytes_read": s["bytes_read"],
                         "read_over_dirty": round(s["bytes_read"] / s["bytes_dirty"], 3) if s["bytes_dirty"] else None,
                         "bytes_added": du(work / "t") - before, "change_source": s["change_source"],
                         "notes": s["notes"]}
    shutil.rmtree(work, ignore_errors=True)
    return out


def anchors(ds: Path, work: Path, tools: list[str]) -> dict[str, dict]:
    """The peers' image runs, timed by anchors.sh (through bench/files.py's runner)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from files import anchors as run_anchors  # type: ignore[import-not-found]

    return {f"{tool}:{scen}": v for (tool, scen), v in run_anchors(ds, work, tools).items()
            if scen.startswith("image")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dv-bench-volume"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "volume.json")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peers", nargs="*", default=["borg", "restic"])
    ap.add_argument("--block-sizes", nargs="*", default=["64K", "256K", "1M", "4M"])
    ap.add_argument("--default-block-size", default="1M")
    ap.add_argument("--skip-qemu", action="store_true")
    ap.add_argument("--skip-peers", action="store_true")
    a = ap.parse_args()
    ds = a.datasets.resolve()
    res: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
                 "repeat": a.repeat, "runs": {}}
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log("ground truth: changed pages v1 -> v2")
    changed = changed_pages(ds / "disk-v1.img", ds / "disk-v2.img") * 4096
    res["budget"] = budget(ds / "disk-v2.img", changed)
    runs: dict[str, list[dict]] = {}
    for i in range(a.repeat):
        if not a.skip_peers:
            log(f"round {i + 1}: peers {a.peers}")
            for k, v in anchors(ds, a.work / "anchors", a.peers).items():
                runs.setdefault(k, []).append(v)
        log(f"round {i + 1}: deltavault fs-digests")
        for k, v in volume_pair(ds, a.work / "dv", block_size=a.default_block_size,
                                check_restore=i == 0).items():
            runs.setdefault(f"deltavault:{k}", []).append(v)
        log(f"round {i + 1}: deltavault block digests")
        for k, v in volume_pair(ds, a.work / "dv", block_size=a.default_block_size, cbt="digests").items():
            runs.setdefault(f"deltavault-digests:{k}", []).append(v)
        if not a.skip_qemu:
            log(f"round {i + 1}: deltavault qemu bitmap")
            for k, v in qemu_pair(ds, a.work / "qemu", a.default_block_size).items():
                runs.setdefault(f"deltavault:{k}", []).append(v)
    for i in range(a.repeat):
        for bs in a.block_sizes:
            log(f"round {i + 1}: block size {bs}")
            for k, v in volume_pair(ds, a.work / "dv", block_size=bs).items():
                runs.setdefault(f"block-size-{bs}:{k}", []).append(v)
    res["runs"] = runs
    res["median"] = {k: {f: statistics.median(r[f] for r in rs) for f in ("seconds", "bytes_added", "bytes_read")
                         if all(isinstance(r.get(f), int | float) for r in rs)} for k, rs in runs.items()}
    med = res["median"]
    if "borg:image-incr" in med and "deltavault:image-incr" in med:
        res["ratios"] = {
            "incr_time_vs_borg": round(med["deltavault:image-incr"]["seconds"] / med["borg:image-incr"]["seconds"], 3),
            "incr_time_vs_restic": round(med["deltavault:image-incr"]["seconds"]
                                         / med.get("restic:image-incr", {"seconds": float("nan")})["seconds"], 3),
        }
    res["ratios"] = res.get("ratios", {})
    res["ratios"]["incr_read_vs_budget"] = round(med["deltavault:image-incr"]["bytes_read"]
                                                 / res["budget"]["budget_bytes"], 3)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps({"budget": res["budget"], "median": med, "ratios": res["ratios"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
