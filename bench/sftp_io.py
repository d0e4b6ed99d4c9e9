#!/usr/bin/env python3
"""The SFTP backend's own cost: one thread puts a 64 MiB object to the test suite's sshd on
127.0.0.1 (tests/sshd.py) and reads it back in one 64 MiB get and in 1 MiB gets, three
times; MB/s and the client's CPU seconds (user + system) of each.

Usage: PYTHONPATH=SRC:. bench/sftp_io.py   (SRC: the src/ directory to measure)
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from tests.sshd import sshd

from deltavault.backends import open_backend
from deltavault.backends.base import unwrap


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


work = Path(tempfile.mkdtemp(dir="/tmp"))
try:
    with sshd(work) as srv:
        os.environ["DELTAVAULT_SSH_CONFIG"] = str(srv.ssh_config)
        data = os.urandom(64 << 20)
        for _round in range(3):
            b = open_backend(srv.url(work / "r"))
            t0, c0 = time.perf_counter(), cpu()
            b.put("data/aa/p", data)
            print(f"put 64 MiB: {len(data) / (time.perf_counter() - t0) / 1e6:6.1f} MB/s, {cpu() - c0:.2f} CPU-s, sizes {getattr(unwrap(b), '_sizes', None)}", flush=True)
            for span in (64 << 20, 1 << 20):
                t0, c0 = time.perf_counter(), cpu()
                for pos in range(0, len(data), span):
                    got = b.get("data/aa/p", pos, span)
                    assert len(got) == min(span, len(data) - pos)
                dt, dc = time.perf_counter() - t0, cpu() - c0
                print(f"  get span {span >> 10}K: {len(data) / dt / 1e6:6.1f} MB/s, {dc:.2f} CPU-s", flush=True)
            assert b.get("data/aa/p") == data
finally:
    shutil.rmtree(work, ignore_errors=True)
