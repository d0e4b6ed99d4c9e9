#!/usr/bin/env python3
"""Peak memory of a backup, the whole process tree counted, against another revision.

Runs files-full (tree-v1 + db-v1, staged as bench/files.py stages them), image-full
(disk-v1.img, ``backup --volume``) and, asked for (``incr``), files-incr (tree-v2 + db-v2
after an unmeasured backup of v1: the delta path) for each src/ directory given, interleaved round by
round (A B, then B A, ...), each a fresh CLI process into a fresh repository and cache.
For each run it records:

- **tree peak RSS**: the largest sum of VmRSS over the process and all its descendants
  (the page-digest helper), sampled every 5 ms. A child between its fork and its exec
  (its command line still its parent's) is not counted: it shows its parent's pages (with
  vfork, the very same memory) as its own;
- **tree peak PSS**: the same with each process's Pss (smaps_rollup), where a shared page
  counts once, split between its sharers: what the tree really holds;
- the sum of each process's VmHWM (an upper bound: the peaks need not coincide);
- wall time, and user+sys CPU of the process and its reaped children (wait4).

    bench/memory.py --datasets /work/data/ds --src A=/tmp/base/src --src B=src [--rounds 3]
        [--scenarios files image] [--env B:DELTAVAULT_MAX_MEMORY=512M]
        [--repo local|sftp|s3] [--peers restic]

Each --src is put first on PYTHONPATH (the installed dependencies are shared).

``--repo sftp`` puts every repository on the test suite's OpenSSH server on 127.0.0.1
(tests/sshd.py), ``--repo s3`` in a fresh bucket of the test suite's SeaweedFS
(tests/seaweed.py); one server for the whole run, its memory not counted (it is not in the
measured tree). ``--peers restic`` adds restic's files-full backup into the same kind of
repository at bench/peers.py's settings, in the same rounds; its tree counts the ssh
process its sftp backend pipes through (deltavault's SSH runs in-process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.files import stage  # noqa: E402
from bench.peers import RESTIC_BACKUP, RESTIC_INIT  # noqa: E402
from bench.procs import children  # noqa: E402

MiB = 1 << 20


@dataclass
class Run:
    seconds: float
    cpu: float
    tree_rss_mib: float  # max over samples of the sum of VmRSS over the tree
    tree_pss_mib: float  # max over samples of the sum of Pss over the tree
    hwm_sum_mib: float  # sum over processes of VmHWM
    procs: int
    per_proc: dict[str, float]  # VmHWM (MiB) of each process, by pid and command
    timed_out: bool = False  # killed at ``timeout`` (bench/sparse_volume.py's peers)
    rchar: int = 0  # bytes its tree read with read(2) and kin (source, repository, libraries)
    read_bytes: int = 0  # bytes its tree had fetched from storage (0 from a warm page cache)


def _status(pid: int) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"VmRSS:", b"VmHWM:")):
                    k, v = line.split(b":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _io(pid: int) -> dict[bytes, int]:
    """/proc/PID/io; read from the zombie, it counts the children it reaped too."""
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            return {k: int(v) for k, v in (line.split(b":", 1) for line in f)}
    except OSError:
        return {}


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"




def measured(argv: list[str], env: dict[str, str], interval: float = 0.005, *, timeout: float | None = None,
             output: list[bytes] | None = None) -> Run:
    """Run ``argv`` to its end, or kill it after ``timeout`` seconds (then ``timed_out``,
    not an error). ``output``: given, the run's stdout and then its stderr are appended to it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, env=env, stdout=out, stderr=err)
        killer = threading.Timer(timeout, p.kill) if timeout is not None else None
        if killer is not None:
            killer.start()
        peak_sum = 0
        peak_pss = 0
        hwm: dict[int, int] = {}
        names: dict[int, str] = {}
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_sum, peak_pss
            while not done.is_set():
                total = pss = 0
                todo = [(p.pid, "")]
                while todo:
                    pid, parent_cmd = todo.pop()
                    cmd = _cmd(pid)
                    if cmd == parent_cmd:
                        # Between (v)fork and exec: the parent's pages, not memory of its own.
                        todo += [(c, cmd) for c in children(pid)]
                        continue
                    st = _status(pid)
                    total += st.get(b"VmRSS", 0)
                    pss += _pss(pid)
                    if b"VmHWM" in st:
                        hwm[pid] = max(hwm.get(pid, 0), st[b"VmHWM"])
                        names[pid] = cmd
                    todo += [(c, cmd) for c in children(pid)]
                peak_sum = max(peak_sum, total)
                peak_pss = max(peak_pss, pss)
                time.sleep(interval)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        # Sample until the child exits (a zombie has no VmHWM), then reap it with wait4.
        while True:
            try:
                os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
                break
            except ChildProcessError:
                break
        done.set()
        th.join()
        io = _io(p.pid)
        _pid, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
        p.returncode = rc
        timed_out = False
        if killer is not None:
            killer.cancel()
            timed_out = rc == -9 and dt >= timeout  # type: ignore[operator]
        if rc != 0 and not timed_out:
            out.seek(0)
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({rc}):\n{out.read().decode()[-2000:]}"
                             f"{err.read().decode()[-2000:]}")
        if output is not None:
            out.seek(0)
            err.seek(0)
            output += [out.read(), err.read()]
    return Run(dt, ru.ru_utime + ru.ru_stime, peak_sum / MiB, peak_pss / MiB, sum(hwm.values()) / MiB, len(hwm),
               {f"{pid} {names.get(pid, '?')}": round(v / MiB, 1) for pid, v in hwm.items()}, timed_out,
               io.get(b"rchar", 0), io.get(b"read_bytes", 0))


def dv(src: Path, env: dict[str, str], *args: str) -> list[str]:
    env["PYTHONPATH"] = str(src)
    return [sys.executable, "-m", "deltavault", "--json", *args]


ds_of: list[Path] = []  # the datasets directory (for files-incr, staged per run)


class Repos:
    """Where each run's repository goes: a local folder, the sftp server or a new bucket.
    ``url(tool, run_dir)`` returns the location and the environment it needs;
    ``drop()`` frees what the run stored (a bucket's objects: the server keeps running)."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind = kind
        self.work = work
        self._stack = contextlib.ExitStack()
        self.env: dict[str, str] = {}
        self.restic_opts: list[str] = []
        self._buckets: list[str] = []
        if kind == "sftp":
            from tests.sshd import sshd
            d = work / "server"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            self.srv = self._stack.enter_context(sshd(d))
            self.env = {"DELTAVAULT_SSH_CONFIG": str(self.srv.ssh_config)}
            self.restic_opts = ["-o", f"sftp.command=ssh -F {self.srv.ssh_config} dvtest -s sftp"]
        elif kind == "s3":
            from tests.seaweed import server
            shutil.rmtree(work / "seaweed", ignore_errors=True)
            self.sw = self._stack.enter_context(server(work / "seaweed"))
            self.env = self.sw.env()
            self.restic_opts = ["-o", "s3.bucket-lookup=path"]

    def url(self, tool: str, run_dir: Path) -> str:
        if self.kind == "local":
            return str(run_dir / "repo")
        if self.kind == "sftp":
            return self.srv.url(run_dir / "repo") if tool == "deltavault" else f"sftp:dvtest:{run_dir}/repo"
        bucket = self.sw.new_bucket()
        self._buckets.append(bucket)
        return f"s3:{self.sw.endpoint}/{bucket}/repo"

    def drop(self) -> None:
        if self.kind != "s3":
            return  # the repository is under run_dir, removed with it
        c = self.sw.client()
        for bucket in self._buckets:
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    c.delete_objects(Bucket=bucket, Delete={"Objects": keys})
            c.delete_bucket(Bucket=bucket)
        self._buckets.clear()

    def close(self) -> None:
        self._stack.close()


def one(kind: str, tool: str, src_dir: Path, work: Path, staged: Path, base_env: dict[str, str],
        repos: Repos) -> Run:
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = dict(base_env, DELTAVAULT_CACHE_DIR=str(run_dir / "cache"), RESTIC_CACHE_DIR=str(run_dir / "rcache"),
               **repos.env)
    repo = repos.url(tool, run_dir)
    try:
        if tool == "restic":
            r = ["restic", "-r", repo, *repos.restic_opts]
            subprocess.run([*r, "init", *RESTIC_INIT], env=env, check=True, capture_output=True)
            subprocess.run(["sync"], check=True)
            return measured([*r, "backup", "-q", *RESTIC_BACKUP, str(staged / "tree"), str(staged / "db.sqlite")],
                            env)
        subprocess.run(dv(src_dir, env, "-r", repo, "init"), env=env, check=True, capture_output=True)
        subprocess.run(["sync"], check=True)
        if kind == "incr":
            src = run_dir / "src"
            stage(ds_of[0], src, "v1")
            args = ("-r", repo, "backup", str(src / "tree"), str(src / "db.sqlite"))
            subprocess.run(dv(src_dir, env, *args), env=env, check=True, capture_output=True)
            stage(ds_of[0], src, "v2")
            subprocess.run(["sync"], check=True)
            return measured(dv(src_dir, env, *args), env)
        if kind == "files":
            return measured(dv(src_dir, env, "-r", repo, "backup", str(staged / "tree"), str(staged / "db.sqlite")),
                            env)
        return measured(dv(src_dir, env, "-r", repo, "backup", "--volume", str(staged / "disk.img")), env)
    finally:
        repos.drop()
        shutil.rmtree(run_dir, ignore_errors=True)


def label(kind: str) -> str:
    return "files-incr" if kind == "incr" else f"{kind}-full"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--src", action="append", required=True, help="NAME=DIR (a src/ directory)")
    ap.add_argument("--env", action="append", default=[], help="NAME:VAR=VALUE, for that revision only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenarios", nargs="*", default=["files", "image"], choices=["files", "image", "incr"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dv-bench-memory"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "memory.json")
    ap.add_argument("--repo", choices=["local", "sftp", "s3"], default="local", help="where the repositories go")
    ap.add_argument("--peers", nargs="*", default=[], choices=["restic"], help="peers run on files-full")
    a = ap.parse_args()
    srcs = dict(s.split("=", 1) for s in a.src)
    extra: dict[str, dict[str, str]] = {n: {} for n in srcs}
    for e in a.env:
        name, kv = e.split(":", 1)
        k, v = kv.split("=", 1)
        extra[name][k] = v
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env["DELTAVAULT_PASSWORD"] = "bench"
    staged = a.work / "staged"
    ds_of.append(a.datasets)
    if "files" in a.scenarios:
        stage(a.datasets, staged, "v1")
    if "image" in a.scenarios:
        subprocess.run(["cp", "--sparse=always", str(a.datasets / "disk-v1.img"), str(staged / "disk.img")],
                       check=True)
    env["RESTIC_PASSWORD"] = "bench"
    names = list(srcs) + a.peers
    runs: dict[str, dict[str, list[Run]]] = {n: {} for n in names}
    repos = Repos(a.repo, a.work)
    try:
        _rounds(a, names, srcs, extra, env, staged, repos, runs)
    finally:
        repos.close()
        shutil.rmtree(a.work / "seaweed", ignore_errors=True)
        shutil.rmtree(a.work / "server", ignore_errors=True)
    table = []
    for kind in a.scenarios:
        for n in names:
            if kind not in runs[n]:
                continue
            rs = runs[n][kind]
            table.append({"scenario": label(kind), "rev": n, "src": srcs.get(n, n), "env": extra.get(n, {}),
                          "repo": a.repo,
                          "seconds": round(statistics.median(r.seconds for r in rs), 2),
                          "cpu": round(statistics.median(r.cpu for r in rs), 2),
                          "tree_rss_mib": round(statistics.median(r.tree_rss_mib for r in rs)),
                          "tree_rss_max_mib": round(max(r.tree_rss_mib for r in rs)),
                          "tree_pss_mib": round(statistics.median(r.tree_pss_mib for r in rs)),
                          "tree_pss_max_mib": round(max(r.tree_pss_mib for r in rs)),
                          "hwm_sum_mib": round(statistics.median(r.hwm_sum_mib for r in rs)),
                          "runs": [asdict(r) for r in rs]})
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": a.rounds, "repo": a.repo,
              "load_average": os.getloadavg(), "table": table}
    for row in table:
        print(f"{row['scenario']:11} {row['rev']:>8}: {row['seconds']:.2f} s  {row['cpu']:.2f} CPU-s  "
              f"peak RSS {row['tree_rss_mib']} MiB (max {row['tree_rss_max_mib']}, sum HWM {row['hwm_sum_mib']}), "
              f"PSS {row['tree_pss_mib']} MiB (max {row['tree_pss_max_mib']})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")


def _rounds(a: argparse.Namespace, names: list[str], srcs: dict[str, str], extra: dict[str, dict[str, str]],
            env: dict[str, str], staged: Path, repos: Repos, runs: dict[str, dict[str, list[Run]]]) -> None:
    for rnd in range(a.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for kind in a.scenarios:
            for n in order:
                if n in a.peers:
                    if kind != "files":
                        continue
                    r = one(kind, n, Path(), a.work, staged, env, repos)
                else:
                    r = one(kind, "deltavault", Path(srcs[n]).resolve(), a.work, staged, dict(env, **extra[n]), repos)
                runs[n].setdefault(kind, []).append(r)
                print(f"round {rnd + 1} {n} {label(kind)}: {r.seconds:.2f} s, {r.cpu:.2f} CPU-s, "
                      f"tree peak RSS {r.tree_rss_mib:.0f} MiB, PSS {r.tree_pss_mib:.0f} MiB "
                      f"(sum of VmHWM {r.hwm_sum_mib:.0f}, "
                      f"{r.procs} procs: {' / '.join(f'{v:.0f}' for v in r.per_proc.values())})",
                      file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
