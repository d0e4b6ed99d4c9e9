"""The same starting state before every timed run, whatever the tool (issue #18, fair restores).

- ``settle``: ``sync``, then wait until the kernel's dirty and under-writeback pages have
  drained (sync waits only for what was dirty when it started; on the shared machine other
  work keeps writing). Without it, the write-back of the step before (the backup just
  written, the previous restore's unmount into its loop file) could run during the next
  timed restore.
- ``warm``: read a repository's files once, so every tool restores from a repository held
  in the page cache (each has just written its own; this makes it so, not likely so).
- ``compiled``: byte-compile the deltavault package the runs import, once, as an install
  does: with PYTHONDONTWRITEBYTECODE set (as in the helpers' environment) and a checkout
  without ``__pycache__``, every run compiled its ~260 modules at start (0.2 s of a 2 s
  restore, py-spy).
- ``child_cpu``: user and system CPU seconds of the children waited for since the last call,
  to say where a run's time went (system time was what varied between rounds).
"""

from __future__ import annotations

import compileall
import os
import resource
import subprocess
import time
from pathlib import Path

SETTLED_KIB = 32 * 1024  # Dirty + Writeback under this counts as drained
SETTLE_WAIT = 60.0  # seconds at most: a machine that never drains still gets measured


def dirty_kib() -> int:
    """Dirty + Writeback from /proc/meminfo, in KiB."""
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Dirty", "Writeback"):
                total += int(rest.split()[0])
    return total


def settle() -> int:
    """sync, then wait for write-back to drain; returns the KiB still dirty at the end."""
    subprocess.run(["sync"], check=True)
    deadline = time.monotonic() + SETTLE_WAIT
    left = dirty_kib()
    while left >= SETTLED_KIB and time.monotonic() < deadline:
        time.sleep(0.2)
        left = dirty_kib()
    return left


def warm(path: Path) -> int:
    """Read every regular file under ``path`` (a local repository); returns the bytes read."""
    n = 0
    for d, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                while chunk := os.read(fd, 1 << 20):
                    n += len(chunk)
            finally:
                os.close(fd)
    return n


def compiled(python: str, env: dict[str, str]) -> Path:
    """Byte-compile the deltavault package that ``python`` imports under ``env``."""
    where = subprocess.run([python, "-c", "import deltavault; print(deltavault.__path__[0])"], env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    compileall.compile_dir(where, quiet=1)
    return Path(where)


_last = resource.getrusage(resource.RUSAGE_CHILDREN)


def child_cpu() -> tuple[float, float]:
    """(user, system) seconds of the children reaped since the previous call."""
    global _last
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, sys_ = now.ru_utime - _last.ru_utime, now.ru_stime - _last.ru_stime
    _last = now
    return user, sys_
