#!/usr/bin/env python3
"""Scale: a 1 TiB sparse volume with 4 GiB of data (docs/benchmarks.md, issue #18).

Scenario ``ext4``: a sparse image of ``--size-gib`` holding an ext4 made by a default
``mkfs.ext4``, filled through a loop mount with ``--data-gib`` of random data in 64
top-level directories (ext4's Orlov allocator puts each in another flex group, so the data
lies across the volume). Then ``backup --volume`` full; ``--change-mib`` rewritten in place
in 10 files (through a loop mount) and the incremental; an incremental with no change; and
``restore --volume`` of the last snapshot, compared with the image over the union of both
files' data extents (SEEK_DATA; a hole reads as zeros, so this is a full byte comparison).

Scenario ``raw``: the same size with no file system: 64 islands of random data, evenly
spaced; the change is written into 10 of them. No file system, so the block-digest
fallback: every page that is not a hole of the image is read and digested.

Scenario ``peers``: the ext4 image once more, for borg 1.2 with its sparse-aware fixed
chunker (``--sparse --chunker-params fixed,4194304``: holes are not read), full,
incremental and no-change, each run to its end; then restic and borg's default chunker,
which read the holes as zeros, each killed after ``--peer-timeout`` seconds: restic's last
JSON status says how far it got.

Each run is a fresh CLI process, measured by bench/memory.py's ``measured``: wall time,
user+sys CPU (wait4), peak RSS and PSS of the process tree. Bytes read and added are the
--json report's; the repository's growth on disk (du) too. Before each run the page cache
is dropped (the image was just written), so reads are cold. The measured steps take
/tmp/dv-bench.lock (flock), building and comparing do not.

    bench/sparse_volume.py --scenario ext4|raw|peers [--work /tmp/sparse1t-work] [--size-gib 1024]
                           [--data-gib 4] [--change-mib 40] [--peer-timeout 300] [--rounds 1] [--out FILE]

``--rounds``: deltavault's full, incrementals and restore (and, for ``peers``, borg's
``--sparse`` runs, each round into a new repository) repeated on the same image, its
change written anew each round; restic and borg's default chunker run once (they are
killed at the timeout anyway). Each row carries its round.

``--out`` is updated in place: each scenario replaces its own key.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.memory import measured  # noqa: E402
from bench.peers import BORG_CREATE, BORG_INIT, RESTIC_BACKUP, RESTIC_INIT  # noqa: E402
from bench.sparse_memory import build_sparse, fill  # noqa: E402
from bench.volume import du, sh  # noqa: E402

from deltavault.fs.sparse import data_extents  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
DIRS = 64
FILE = 16 * MiB
CHANGED_FILES = 10


LOCKING = True  # --no-lock: smoke runs, whose figures are not recorded


@contextlib.contextmanager
def bench_lock() -> Iterator[None]:
    if not LOCKING:
        yield
        return
    with open("/tmp/dv-bench.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


@contextlib.contextmanager
def mounted(img: Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    # noinit_itable: no background zeroing of inode tables, which would fill the holes.
    sh("mount", "-o", "loop,noinit_itable", str(img), str(mnt))
    try:
        yield mnt
    finally:
        sh("umount", str(mnt))


def write_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
        os.fsync(f.fileno())


def layout(img: Path) -> dict:
    fd = os.open(img, os.O_RDONLY)
    try:
        ext = data_extents(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return {"data_extents": len(ext), "allocated_bytes": sum(n for _, n in ext),
            "last_data_end": max((o + n for o, n in ext), default=0)}


def build_ext4(img: Path, size: int, data: int, mnt: Path) -> dict:
    img.unlink(missing_ok=True)
    sh("truncate", "-s", str(size), str(img))
    sh("mkfs.ext4", "-F", "-q", str(img))
    with mounted(img, mnt) as m:
        per_dir = data // FILE // DIRS
        for d in range(DIRS):
            (m / f"d{d:02}").mkdir()
            for i in range(per_dir):
                write_file(m / f"d{d:02}" / f"f{i}", FILE)
    return layout(img)


def change_ext4(img: Path, change: int, mnt: Path) -> list[str]:
    """Rewrite ``change`` bytes in place: the middle of 10 files in 10 directories."""
    piece = change // CHANGED_FILES
    names = [f"d{d:02}/f0" for d in range(0, DIRS, DIRS // CHANGED_FILES)][:CHANGED_FILES]
    with mounted(img, mnt) as m:
        for n in names:
            fd = os.open(m / n, os.O_WRONLY)
            try:
                os.pwrite(fd, os.urandom(piece), FILE // 2 - piece // 2)
                os.fsync(fd)
            finally:
                os.close(fd)
    return names


def islands(size: int, data: int) -> list[tuple[int, int]]:
    n = 64
    return [(i * (size // n), data // n) for i in range(n)]


def same_bytes(a: Path, b: Path) -> bool:
    """Equal sizes and bytes: compares the union of both files' data extents (elsewhere
    both are holes, zeros)."""
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        size = os.fstat(fa).st_size
        if os.fstat(fb).st_size != size:
            return False
        spans = sorted(data_extents(fa, size) + data_extents(fb, size))
        pos = 0
        for off, ln in spans:
            off, end = max(off, pos), off + ln
            while off < end:
                n = min(8 * MiB, end - off)
                if os.pread(fa, n, off) != os.pread(fb, n, off):
                    return False
                off += n
            pos = max(pos, end)
        return True
    finally:
        os.close(fa)
        os.close(fb)


class Tool:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAVAULT_", "BORG_", "RESTIC_"))}
        self.env.update(DELTAVAULT_PASSWORD="bench", DELTAVAULT_CACHE_DIR=str(work / "cache"),
                        BORG_PASSPHRASE="bench", RESTIC_PASSWORD="bench", BORG_BASE_DIR=str(work / "borg-home"),
                        RESTIC_CACHE_DIR=str(work / "restic-cache"), PYTHONPATH=str(ROOT / "src"))

    def run(self, step: str, argv: list[str], repo: Path, timeout: float | None = None) -> tuple[dict, str]:
        before = du(repo)
        out: list[bytes] = []
        drop_caches()
        with bench_lock():
            load = os.getloadavg()
            r = measured(argv, self.env, 0.02, timeout=timeout, output=out)
        row = {"step": step, **{k: round(v, 1) if isinstance(v, float) else v
                                for k, v in asdict(r).items() if k != "per_proc"},
               "cpu": round(r.cpu, 2), "seconds": round(r.seconds, 2), "repo_growth": du(repo) - before,
               "loadavg_before": [round(x, 2) for x in load]}
        print(json.dumps(row), flush=True)
        return row, out[0].decode(errors="replace") if out else ""

    def dv(self, step: str, repo: Path, *args: str) -> dict:
        row, text = self.run(step, [sys.executable, "-m", "deltavault", "--json", "-r", str(repo), *args], repo)
        lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
        s = ([x for x in lines if x.get("type") == "summary"] or [{}])[-1]
        for k in ("snapshot", "change_source", "notes", "bytes_read", "bytes_to_read", "bytes_added",
                  "bytes_changed", "bytes_zero_skipped", "bytes_free_skipped", "bytes_extra_read", "file_system"):
            if k in s:
                row[k] = s[k]
        return row


def run_dv(tool: Tool, img: Path, change: Callable[[], list[str]], restore: bool) -> dict:
    repo = tool.work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(tool.work / "cache", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "deltavault", "-r", str(repo), "init"], env=tool.env, check=True,
                   capture_output=True)
    rows = [tool.dv("full", repo, "backup", "--volume", str(img))]
    changed = change()
    time.sleep(1.1)
    rows.append(tool.dv("incremental (1% changed)", repo, "backup", "--volume", str(img)))
    rows.append(tool.dv("incremental (no change)", repo, "backup", "--volume", str(img)))
    out: dict = {"runs": rows, "changed": changed, "repo_bytes": du(repo)}
    if restore:
        target = tool.work / "restored.img"
        target.unlink(missing_ok=True)
        rows.append(tool.dv("restore --volume (last)", repo, "restore", "--volume", rows[-1]["snapshot"],
                            str(target)))
        out["restored_equal"] = same_bytes(img, target)
        out["restored_layout"] = layout(target)
        target.unlink()
    shutil.rmtree(repo)
    return out


def dv_rounds(tool: Tool, img: Path, change: Callable[[], list[str]], restore: bool, rounds: int) -> dict:
    """run_dv ``rounds`` times on the same image (changed again each round): every run's
    row, tagged with its round, and each round's own facts."""
    each = [run_dv(tool, img, change, restore) for _ in range(rounds)]
    runs = [{**row, "round": i + 1} for i, r in enumerate(each) for row in r.pop("runs")]
    return {"runs": runs, "per_round": each}


def restic_progress(text: str) -> dict:
    last: dict = {}
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                last = json.loads(line)
    return {k: last[k] for k in ("message_type", "percent_done", "bytes_done", "total_bytes",
                                 "total_bytes_processed", "data_added") if k in last}


def run_peers(tool: Tool, img: Path, change: Callable[[], list[str]], timeout: float, rounds: int) -> dict:
    """borg's sparse-aware fixed chunker ``rounds`` times (full, 1% changed, no change, each
    round a new repository); then restic and borg's default chunker, which read the holes,
    once each, killed at ``timeout``."""
    w = tool.work
    out: dict = {"changed": [], "borg_sparse": []}
    borg = w / "borg"
    sparse = ["--sparse", "--chunker-params", "fixed,4194304"]
    for rnd in range(rounds):
        shutil.rmtree(borg, ignore_errors=True)
        shutil.rmtree(w / "borg-home", ignore_errors=True)
        subprocess.run(["borg", "init", *BORG_INIT, str(borg)], env=tool.env, check=True, capture_output=True)
        for i, step in enumerate(("full", "incremental (1% changed)", "incremental (no change)")):
            if i == 1:
                out["changed"].append(change())
            row, _ = tool.run(f"borg --sparse fixed 4 MiB: {step}", ["borg", "create", *BORG_CREATE, *sparse,
                              f"{borg}::s{i}", str(img)], borg)
            out["borg_sparse"].append({**row, "round": rnd + 1})
    shutil.rmtree(borg)
    restic = w / "restic"
    shutil.rmtree(restic, ignore_errors=True)
    subprocess.run(["restic", "-r", str(restic), "init", *RESTIC_INIT], env=tool.env, check=True, capture_output=True)
    row, text = tool.run("restic: full", ["restic", "-r", str(restic), "backup", "--json", *RESTIC_BACKUP, str(img)],
                         restic, timeout)
    row["progress"] = restic_progress(text)
    out["restic"] = [row]
    shutil.rmtree(restic)
    subprocess.run(["borg", "init", *BORG_INIT, str(borg)], env=tool.env, check=True, capture_output=True)
    row, _ = tool.run("borg default chunker: full", ["borg", "create", *BORG_CREATE, f"{borg}::s0", str(img)],
                      borg, timeout)
    out["borg_default"] = [row]
    shutil.rmtree(borg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=("ext4", "raw", "peers"), required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sparse1t-work"))
    ap.add_argument("--size-gib", type=int, default=1024)
    ap.add_argument("--data-gib", type=int, default=4)
    ap.add_argument("--change-mib", type=int, default=40)
    ap.add_argument("--peer-timeout", type=float, default=300)
    ap.add_argument("--no-restore", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="deltavault's (and borg --sparse's) runs, repeated")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-lock", action="store_true", help="smoke runs only: measure without the bench lock")
    a = ap.parse_args()
    global LOCKING
    LOCKING = not a.no_lock
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    size, data, change = a.size_gib * GiB, a.data_gib * GiB, a.change_mib * MiB
    img, mnt = work / "volume.img", work / "mnt"
    tool = Tool(work)
    t0 = time.time()
    if a.scenario == "raw":
        img.unlink(missing_ok=True)
        build_sparse(img, size, islands(size, data))
        built = layout(img)
        piece = change // CHANGED_FILES

        def change_fn() -> list[str]:
            where = islands(size, data)[:: 64 // CHANGED_FILES][:CHANGED_FILES]
            for off, ln in where:
                fill(img, off + ln // 2, piece)
            return [f"{piece} bytes at {off + ln // 2}" for off, ln in where]
        result = dv_rounds(tool, img, change_fn, not a.no_restore, a.rounds)
    else:
        built = build_ext4(img, size, data, mnt)
        result = (dv_rounds(tool, img, lambda: change_ext4(img, change, mnt), not a.no_restore, a.rounds)
                  if a.scenario == "ext4" else
                  run_peers(tool, img, lambda: change_ext4(img, change, mnt), a.peer_timeout, a.rounds))
    img.unlink()
    doc = {"scenario": a.scenario, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
           "ended": time.strftime("%H:%M UTC", time.gmtime()), "rounds": a.rounds,
           "size_gib": a.size_gib, "data_gib": a.data_gib, "change_mib": a.change_mib, "cpus": os.cpu_count(),
           "image": built, **result}
    text = json.dumps(doc, indent=2)
    print(text)
    if a.out:
        all_ = json.loads(a.out.read_text()) if a.out.exists() else {"benchmark": "sparse_volume"}
        all_[a.scenario] = doc
        a.out.write_text(json.dumps(all_, indent=2) + "\n")


if __name__ == "__main__":
    main()
