#!/usr/bin/env python3
"""Sync with another host against rsync over ssh, in the same run, on the shared datasets.

    .venv/bin/python bench/sync_remote.py --datasets /work/data/ds [--direction push|pull] [--repeat 3]

The "remote" host is a real OpenSSH server on 127.0.0.1 (the test suite's, tests/sshd.py),
so both tools pay for ssh's encryption on the same 2 cores, and both write to the same fresh
XFS on a loop device (bench/sync.py's Loop). Scenarios, staged as bench/sync.py stages them:
  full  first push of tree-v1 + db-v1.sqlite      rsync -a -e ssh          vs deltavault sync SRC host:DST
  incr  after staging v2                          rsync -a --delete -e ssh vs deltavault sync --delete
With --direction pull, the same trees are pulled from the server instead (SRC is
dvtest:PATH). "Sent" is what crossed the ssh channel from the source side: rsync's "Total
bytes sent" (received, for a pull), deltavault's wire_sent (wire_received). Takes /tmp/dv-bench.lock. Needs root (loop devices, sshd).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sync import Loop, changed_bytes, same_tree, settle, stage  # noqa: E402
from tests.sshd import sshd  # noqa: E402

PY = sys.executable


def timed(loop: Loop, argv: list[str], env: dict[str, str], pull: bool) -> dict:
    loop.remount()
    settle()
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    out: dict = {"seconds": round(seconds, 3)}
    # What the source side sent: a pull's client receives it.
    m = re.search(r"Total bytes received: ([\d,]+)" if pull else r"Total bytes sent: ([\d,]+)", p.stdout)
    if m:
        out["sent"] = int(m.group(1).replace(",", ""))
    for line in p.stdout.splitlines():
        if line.startswith('{"type": "summary"'):
            s = json.loads(line)
            out["sent"] = s["wire_received" if pull else "wire_sent"]
            out["summary"] = {k: s[k] for k in ("files_new", "files_updated", "files_delta", "files_same",
                                                "meta_fixed", "deleted", "bytes_written", "delta_wire_bytes",
                                                "errors")}
    return out


def run(args: argparse.Namespace) -> dict:
    ds = Path(args.datasets).resolve()
    work = Path(tempfile.mkdtemp(prefix="dv-bench-remote-"))
    src = work / "src"
    loop = Loop(work, args.dst_gb)
    pull = args.direction == "pull"
    res: dict = {"repeat": args.repeat, "direction": args.direction, "full": {"rsync": [], "deltavault": []},
                 "incr": {"rsync": [], "deltavault": []}}
    try:
        with sshd(work) as server:
            cfg = str(server.ssh_config)
            env = {**os.environ, "DELTAVAULT_SSH_CONFIG": cfg}
            agent = f"{PY} -m deltavault"

            def argv(tool: str, dst: Path, incr: bool) -> list[str]:
                a, b = (f"dvtest:{src}", str(dst)) if pull else (str(src), f"dvtest:{dst}")
                if tool == "rsync":
                    return ["rsync", "-a", "--stats", *(["--delete"] if incr else []), "-e", f"ssh -F {cfg}",
                            f"{a}/", f"{b}/"]
                return [PY, "-m", "deltavault", "--json", "sync", "--remote-command", agent,
                        *(["--delete"] if incr else []), a, b]

            res["changed"] = changed_bytes(ds)
            for rep in range(args.repeat):
                for tool in ("rsync", "deltavault"):
                    if (loop.mnt / tool).exists():
                        shutil.rmtree(loop.mnt / tool)
                for version, sc in (("v1", "full"), ("v2", "incr")):
                    stage(ds, src, version)
                    for tool in ("rsync", "deltavault") if rep % 2 == 0 else ("deltavault", "rsync"):
                        dst = loop.mnt / tool
                        res[sc][tool].append(timed(loop, argv(tool, dst, sc == "incr"), env, pull))
                        if not same_tree(src, dst):
                            raise SystemExit(f"{tool} {sc} left differences")
                print(f"rep {rep + 1}: " + ", ".join(
                    f"{sc} {tool} {res[sc][tool][-1]['seconds']:.2f}s sent {res[sc][tool][-1]['sent'] / 1e6:.1f} MB"
                    for sc in ("full", "incr") for tool in ("rsync", "deltavault")), flush=True)
    finally:
        loop.close()
        shutil.rmtree(work, ignore_errors=True)
    for sc in ("full", "incr"):
        r = [x["seconds"] for x in res[sc]["rsync"]]
        d = [x["seconds"] for x in res[sc]["deltavault"]]
        res[f"{sc}_median"] = {"rsync_s": statistics.median(r), "deltavault_s": statistics.median(d),
                               "ratio": statistics.median(round(a / b, 3) for a, b in zip(d, r)),
                               "rsync_sent": statistics.median(x["sent"] for x in res[sc]["rsync"]),
                               "deltavault_sent": statistics.median(x["sent"] for x in res[sc]["deltavault"])}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dst-gb", type=int, default=8)
    ap.add_argument("--direction", choices=["push", "pull"], default="push")
    ap.add_argument("--out")
    args = ap.parse_args()
    args.out = args.out or str(ROOT / f"bench/out/sync_remote{'_pull' if args.direction == 'pull' else ''}.json")
    with open("/tmp/dv-bench.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    for sc in ("full", "incr"):
        m = res[f"{sc}_median"]
        print(f"{sc}: rsync {m['rsync_s']:.2f}s sent {m['rsync_sent'] / 1e6:.1f} MB; deltavault "
              f"{m['deltavault_s']:.2f}s sent {m['deltavault_sent'] / 1e6:.1f} MB; time ratio {m['ratio']}")
    print(f"changed bytes: {res['changed']['total'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
