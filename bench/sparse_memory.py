#!/usr/bin/env python3
"""Peak memory of backing up a huge sparse file (docs/benchmarks.md, issue #12).

A 100 GiB sparse file holding 2 GiB of random data (two 1 GiB islands) is backed up with
the CLI; then 1 GiB of its hole is filled with data and it is backed up again (the delta
path: the former hole is streamed through the chunker). After each backup the snapshot is
restored and compared with the source: size, and SHA-256 over (offset, bytes) of every
data extent (``tests.treeutil.content_digest``; equal digests mean equal bytes and equal
holes). The first snapshot is restored again at the end, and ``check --read-data`` runs.

Each step's wall time and peak RSS are reported, for the deltavault process and for its
helper processes (the page-digest helper) separately and summed: each process's VmHWM
from /proc, sampled every 20 ms until it exits.

    flock /tmp/dv-bench.lock .venv/bin/python bench/sparse_memory.py [--work DIR] [--size-gib 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.procs import children  # noqa: E402
from tests.treeutil import content_digest  # noqa: E402

GiB = 1 << 30
PIECE = 16 << 20


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_main: int  # bytes
    peak_helpers: int  # bytes, summed over every descendant

    @property
    def peak_total(self) -> int:
        return self.peak_main + self.peak_helpers

    def row(self, step: str) -> dict[str, object]:
        mib = 1 << 20
        return {"step": step, "seconds": round(self.seconds, 2), "peak_rss_main_mib": round(self.peak_main / mib, 1),
                "peak_rss_helpers_mib": round(self.peak_helpers / mib, 1),
                "peak_rss_total_mib": round(self.peak_total / mib, 1)}


def _hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None




def run_measured(argv: list[str], env: dict[str, str], *, interval: float = 0.02) -> Measured:
    """Run ``argv``; the peak RSS of it and of every process it starts, sampled until each exits."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, env=env, stdout=out, stderr=err)
        peaks: dict[int, int] = {}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                todo = [p.pid]
                while todo:
                    pid = todo.pop()
                    hwm = _hwm(pid)
                    if hwm is not None:
                        peaks[pid] = max(peaks.get(pid, 0), hwm)
                    todo += children(pid)
                time.sleep(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # waitid(WNOWAIT) leaves the exited child a zombie whose VmHWM is gone, so sample
        # until it exits rather than reading /proc afterwards.
        rc = p.wait()
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        main = peaks.pop(p.pid, 0)
        return Measured(rc, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                        seconds, main, sum(peaks.values()))


def write_random(fd: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        n = min(PIECE, end - offset)
        os.pwrite(fd, os.urandom(n), offset)
        offset += n


def build_sparse(path: Path, size: int, islands: list[tuple[int, int]]) -> None:
    """A sparse file of ``size`` bytes with random data at each (offset, length)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off, ln in islands:
            write_random(fd, off, ln)
        os.fsync(fd)
    finally:
        os.close(fd)


def fill(path: Path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        write_random(fd, offset, length)
        os.fsync(fd)
    finally:
        os.close(fd)


def digest(path: Path) -> tuple[int, str]:
    size = path.stat().st_size
    return size, content_digest(os.fsencode(path), size)


class Deltavault:
    def __init__(self, work: Path) -> None:
        pw = work / "password"
        pw.write_text("bench\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
        self.env.update(DELTAVAULT_REPOSITORY=str(work / "repo"), DELTAVAULT_PASSWORD_FILE=str(pw),
                        DELTAVAULT_CACHE_DIR=str(work / "cache"))

    def __call__(self, *args: str) -> Measured:
        m = run_measured([sys.executable, "-m", "deltavault", "--json", *args], self.env)
        if m.returncode != 0:
            raise RuntimeError(f"deltavault {' '.join(args)} exited {m.returncode}:\n{m.stdout}{m.stderr}")
        return m

    def backup(self, src: Path) -> tuple[Measured, str]:
        """Back up ``src``; returns the run and the new snapshot's id."""
        m = self("backup", str(src))
        lines = [json.loads(x) for x in m.stdout.splitlines() if x.startswith("{")]
        return m, [x for x in lines if x.get("type") == "summary"][-1]["snapshot"]


def restore_equal(dv: Deltavault, snap: str, target: Path, want: tuple[int, str], rows: list[dict[str, object]],
                  step: str) -> bool:
    m = dv("restore", snap, "--target", str(target))
    rows.append(m.row(step))
    got = digest(target / "src" / "sparse.img")
    shutil.rmtree(target)
    return got == want


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, help="scratch directory (default: a new one under /var/tmp)")
    ap.add_argument("--size-gib", type=int, default=100)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="dv-sparse-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    size = a.size_gib * GiB
    try:
        dv = Deltavault(work)
        dv("init")
        src = work / "src"
        src.mkdir()
        img = src / "sparse.img"
        islands = [(0, GiB), (size // 2, GiB)]  # 2 GiB of data
        build_sparse(img, size, islands)
        rows: list[dict[str, object]] = []
        v1 = digest(img)
        m, first = dv.backup(src)
        rows.append(m.row("backup (2 GiB of data)"))
        ok1 = restore_equal(dv, first, work / "out", v1, rows, "restore (first snapshot)")
        fill(img, size // 5, GiB)  # 1 GiB of the hole now holds data
        v2 = digest(img)
        time.sleep(2.1)  # past the racy window, as a later run would be
        m, second = dv.backup(src)
        rows.append(m.row("backup (1 GiB of the hole filled)"))
        ok2 = restore_equal(dv, second, work / "out", v2, rows, "restore (second snapshot)")
        ok1_again = restore_equal(dv, first, work / "out", v1, rows, "restore (first snapshot, again)")
        rows.append(dv("check", "--read-data").row("check --read-data"))
        result = {"benchmark": "sparse_memory", "file_size_gib": a.size_gib, "data_gib": 2, "filled_gib": 1,
                  "cpus": os.cpu_count(), "steps": rows,
                  "restored_equal": {"first": ok1, "second": ok2, "first_again": ok1_again}}
        text = json.dumps(result, indent=2)
        print(text)
        if a.out:
            a.out.write_text(text + "\n")
        if not (ok1 and ok2 and ok1_again):
            raise SystemExit("a restored file differs from its source")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
