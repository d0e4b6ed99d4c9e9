#!/usr/bin/env python3
"""Recovery without a full restore: deltavault mount against restic mount and borg mount,
file-level restore from a volume backup against a full restore plus loop mount, and the
NBD export against restore --volume. Peers are measured in the same run.

1. A 1 GiB incompressible file, backed up by each tool into its own repository, read
   through each tool's FUSE mount with 1 MiB reads: cold (page cache dropped, a fresh
   mount process) and warm (read again three times, same mount; the median). Time to
   first byte: a fresh mount, then one 4 KiB read at a random offset (open to data).
   The ceiling of a warm read: the same reader on the source file (ext4, cached), and
   the FUSE requests each warm read sent its daemon (a tracefs event, when the kernel
   has it): a warm read that needs none runs at page-cache speed whatever the tool.
2. disk-v1.img (2 GiB, ext4) of the shared datasets backed up as a volume; one 10 MiB file
   out of it by ``restore --volume --files`` (bytes read from the repository, wall time)
   against ``restore --volume`` of the whole image, then loop mount and copy.
3. The NBD export read sequentially (nbdcopy to null:) against ``restore --volume`` to a file.

Every tool encrypts and compresses with zstd: the peers with bench/peers.py's settings (borg
repokey-blake2 and zstd,3; restic repository v2, compression auto).

Usage: bench/mount.py --datasets DIR [--work DIR] [--out FILE] [--size-mib 1024] [--peers restic borg]
Run it under flock /tmp/dv-bench.lock (root: drops caches, mounts).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from peers import BORG_CREATE, BORG_INIT, DESCRIPTION, RESTIC_BACKUP, RESTIC_INIT  # noqa: E402

MiB = 1 << 20
TEN_MIB_FILE = "tree/numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so"


def sh(*cmd: str, env: dict[str, str] | None = None, input: str | None = None) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, env=env, input=input).stdout


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    return any(line.split()[4] == real for line in Path("/proc/self/mountinfo").read_text().splitlines())


class Tool:
    def __init__(self, name: str, work: Path) -> None:
        self.name = name
        self.work = work
        self.repo = work / f"repo-{name}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAVAULT_", "RESTIC_", "BORG_"))}
        self.env.update(DELTAVAULT_REPOSITORY=str(self.repo), DELTAVAULT_PASSWORD="bench",
                        DELTAVAULT_CACHE_DIR=str(work / "dv-cache"), PYTHONPATH=str(ROOT / "src"),
                        RESTIC_REPOSITORY=str(self.repo), RESTIC_PASSWORD="bench",
                        RESTIC_CACHE_DIR=str(work / "restic-cache"), BORG_REPO=str(self.repo),
                        BORG_PASSPHRASE="bench", BORG_BASE_DIR=str(work / "borg-base"),
                        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")

    def dv(self, *args: str) -> dict:
        p = subprocess.run([sys.executable, "-m", "deltavault", "--json", *args], env=self.env,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"deltavault {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
        lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
        return ([x for x in lines if x.get("type") == "summary"] or [{}])[-1]

    def backup(self, src: Path) -> None:
        if self.name == "deltavault":
            self.dv("init")
            self.dv("backup", str(src))
        elif self.name == "restic":
            sh("restic", "init", *RESTIC_INIT, env=self.env)
            sh("restic", "backup", *RESTIC_BACKUP, str(src), env=self.env)
        else:
            sh("borg", "init", *BORG_INIT, env=self.env)
            sh("borg", "create", *BORG_CREATE, "::a", str(src), env=self.env)

    def mount(self, mnt: Path) -> subprocess.Popen[bytes]:
        mnt.mkdir(exist_ok=True)
        argv = {"deltavault": [sys.executable, "-m", "deltavault", "mount", str(mnt)],
                "restic": ["restic", "mount", "--allow-other=false", str(mnt)],
                "borg": ["borg", "mount", "-f", "::a", str(mnt)]}[self.name]
        proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name} mount did not come up")
            time.sleep(0.05)
        return proc

    def file_in(self, mnt: Path, rel: str) -> Path:
        if self.name == "deltavault":
            snap = next(n for n in os.listdir(mnt / "snapshots") if n != "latest")
            return mnt / "snapshots" / snap / Path(rel).parts[-2] / Path(rel).name
        if self.name == "restic":
            return mnt / "snapshots" / "latest" / rel.lstrip("/")
        return mnt / rel.lstrip("/")

    @staticmethod
    def unmount(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)])


TRACEFS = Path("/sys/kernel/tracing")


class FuseRequests:
    """Counts the FUSE requests the kernel sends one mount's daemon (the fuse_request_send
    event in a private tracefs instance); ``None`` where the kernel lacks the event."""

    def __init__(self, mnt: Path) -> None:
        dev = os.stat(mnt).st_dev
        self.dev = (os.major(dev) << 20) | os.minor(dev)  # the kernel's s_dev encoding
        self.inst: Path | None = None
        if not (TRACEFS / "events").is_dir():  # tracefs not mounted yet (we run as root)
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True)
        if (TRACEFS / "events" / "fuse" / "fuse_request_send").is_dir():
            self.inst = TRACEFS / "instances" / f"dv-bench-mount-{os.getpid()}"
            self.inst.mkdir()

    def __enter__(self) -> FuseRequests:
        if self.inst is not None:
            ev = self.inst / "events" / "fuse" / "fuse_request_send"
            (ev / "filter").write_text(f"connection == {self.dev}\n")
            (self.inst / "trace").write_text("")
            (ev / "enable").write_text("1\n")
        return self

    def count(self) -> int | None:
        if self.inst is None:
            return None
        lines = (self.inst / "trace").read_text().splitlines()
        (self.inst / "trace").write_text("")
        return sum(1 for x in lines if "fuse_request_send" in x)

    def __exit__(self, *exc: object) -> None:
        if self.inst is not None:
            (self.inst / "events" / "fuse" / "fuse_request_send" / "enable").write_text("0\n")
            self.inst.rmdir()


def read_all(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(MiB):
            pass
    return time.perf_counter() - t0


def file_reads(work: Path, size_mib: int, peers: list[str]) -> dict:
    src = work / "src"
    src.mkdir(exist_ok=True)
    big = src / "big.bin"
    if not big.exists() or big.stat().st_size != size_mib * MiB:
        rnd = random.Random(1)
        with open(big, "wb") as f:
            for _ in range(size_mib):
                f.write(rnd.randbytes(MiB))
    rel = str(big)
    out: dict = {"size_mib": size_mib, "tools": {}}
    # The ceiling of a warm read: the same reader on the source file, cached (one read
    # to bring it in, then the median of three).
    read_all(big)
    out["page_cache_ceiling_s"] = round(sorted(read_all(big) for _ in range(3))[1], 3)
    out["page_cache_ceiling_mb_s"] = round(size_mib * MiB / 1e6 / out["page_cache_ceiling_s"], 1)
    print("page cache ceiling", out["page_cache_ceiling_s"], "s", flush=True)
    for name in ["deltavault", *peers]:
        tool = Tool(name, work)
        shutil.rmtree(tool.repo, ignore_errors=True)
        t0 = time.perf_counter()
        tool.backup(src)
        res: dict = {"backup_s": round(time.perf_counter() - t0, 2)}
        mnt = work / f"mnt-{name}"
        # cold read: page cache dropped, fresh mount process
        drop_caches()
        proc = tool.mount(mnt)
        try:
            path = tool.file_in(mnt, rel)
            with FuseRequests(mnt) as requests:
                res["cold_s"] = round(read_all(path), 3)
                res["cold_requests"] = requests.count()
                warm = []
                for _ in range(3):
                    warm.append((read_all(path), requests.count()))
            res["warm_runs_s"] = [round(t, 3) for t, _n in warm]
            res["warm_requests"] = [n for _t, n in warm]
            res["warm_s"] = round(sorted(t for t, _n in warm)[1], 3)
        finally:
            tool.unmount(mnt, proc)
        ttfb = []
        for i in range(3):
            drop_caches()
            proc = tool.mount(mnt)
            try:
                path = tool.file_in(mnt, rel)
                off = random.Random(i).randrange(0, size_mib * MiB - 4096) // 4096 * 4096
                t0 = time.perf_counter()
                fd = os.open(path, os.O_RDONLY)
                data = os.pread(fd, 4096, off)
                ttfb.append(time.perf_counter() - t0)
                os.close(fd)
                assert len(data) == 4096
            finally:
                tool.unmount(mnt, proc)
        res["ttfb_ms"] = round(1000 * sorted(ttfb)[1], 1)
        for k in ("cold", "warm"):
            res[f"{k}_mb_s"] = round(size_mib * MiB / 1e6 / res[f"{k}_s"], 1)
        out["tools"][name] = res
        print(name, res, flush=True)
    return out


def volume(work: Path, datasets: Path) -> dict:
    img = datasets / "disk-v1.img"
    tool = Tool("dv-volume", work)
    tool.name = "deltavault"
    shutil.rmtree(tool.repo, ignore_errors=True)
    tool.dv("init")
    t0 = time.perf_counter()
    tool.dv("backup", "--volume", str(img))
    res: dict = {"image_bytes": img.stat().st_size, "backup_s": round(time.perf_counter() - t0, 2)}
    # one 10 MiB file
    out = work / "files-out"
    shutil.rmtree(out, ignore_errors=True)
    drop_caches()
    t0 = time.perf_counter()
    s = tool.dv("restore", "--volume", "latest", "--files", TEN_MIB_FILE, "--target", str(out))
    res["files"] = {"wall_s": round(time.perf_counter() - t0, 2), "bytes_read": s["bytes_read"],
                    "bytes_copied": s["bytes_copied"]}
    # the alternative: the whole image, then loop mount and copy
    full = work / "full.img"
    full.unlink(missing_ok=True)
    drop_caches()
    t0 = time.perf_counter()
    tool.dv("restore", "--volume", "latest", str(full))
    mnt = work / "loopmnt"
    mnt.mkdir(exist_ok=True)
    sh("mount", "-o", "loop,ro", str(full), str(mnt))
    try:
        shutil.copy2(mnt / TEN_MIB_FILE, work / "copied.so")
    finally:
        sh("umount", str(mnt))
    # the repository holds this one snapshot: a full restore reads every block of it
    packs = sum(f.stat().st_size for f in (tool.repo / "data").rglob("*") if f.is_file())
    res["full"] = {"wall_s": round(time.perf_counter() - t0, 2), "bytes_read": packs}
    assert (work / "copied.so").read_bytes() == (out / TEN_MIB_FILE).read_bytes()
    # NBD: sequential read of the export vs restore --volume
    drop_caches()
    t0 = time.perf_counter()
    tool.dv("restore", "--volume", "latest", str(full), "--overwrite")
    restore_s = time.perf_counter() - t0
    drop_caches()
    port = str(random.Random().randrange(20000, 30000))
    proc = subprocess.Popen([sys.executable, "-m", "deltavault", "--json", "serve", "--volume", "latest",
                             "--listen", f"127.0.0.1:{port}"], env=tool.env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        while '"serving"' not in proc.stdout.readline():
            if proc.poll() is not None:
                raise SystemExit("serve did not start")
        t0 = time.perf_counter()
        sh("nbdcopy", f"nbd://127.0.0.1:{port}", "null:")
        nbd_s = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    size = img.stat().st_size
    res["nbd"] = {"nbdcopy_s": round(nbd_s, 2), "nbd_mb_s": round(size / 1e6 / nbd_s, 1),
                  "restore_s": round(restore_s, 2), "restore_mb_s": round(size / 1e6 / restore_s, 1)}
    full.unlink(missing_ok=True)
    print("volume", res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dv-bench-mount"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mount.json")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--peers", nargs="*", default=["restic", "borg"])
    ap.add_argument("--skip-volume", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    peers = [p for p in a.peers if shutil.which(p)]
    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "peer_settings": DESCRIPTION,
              "file": file_reads(a.work, a.size_mib, peers)}
    if not a.skip_volume:
        result["volume"] = volume(a.work, a.datasets)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
