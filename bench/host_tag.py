"""What host tags cost a backup (docs/benchmarks.md, "Host tags"): loading the host secret
(open, check and read a 32-byte file in a private directory, as each run does once) and
verifying one snapshot's tag (one keyed BLAKE3 of about 100 bytes, as a run without a
catalog does for each snapshot of its source newer than the one it takes).

    flock /tmp/dv-bench.lock .venv/bin/python bench/host_tag.py [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from deltavault.fs.hostsecret import load_host_secret  # noqa: E402
from deltavault.model.snapshot import Snapshot  # noqa: E402
from deltavault.repository.hosttag import HostTagger  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--snapshots", type=int, default=10_000)
    ap.add_argument("--loads", type=int, default=1_000)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    tagger = HostTagger(os.urandom(32), "a" * 64)
    snaps = [tagger.sign(Snapshot(time="", time_ns=i, hostname="db", source_id="db:/srv", tree=os.urandom(32)))
             for i in range(a.snapshots)]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="dv-bench-hosttag-") as tmp:
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            assert all(tagger.wrote(s) for s in snaps)
            verify = (time.perf_counter() - t0) / a.snapshots
            t0 = time.perf_counter()
            for _ in range(a.loads):
                load_host_secret(Path(tmp) / "deltavault")
            load = (time.perf_counter() - t0) / a.loads
            rounds.append({"verify_us": round(verify * 1e6, 2), "load_secret_us": round(load * 1e6, 1)})
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": os.getloadavg(),
           "snapshots": a.snapshots, "loads": a.loads, "rounds": rounds}
    text = json.dumps(out, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
