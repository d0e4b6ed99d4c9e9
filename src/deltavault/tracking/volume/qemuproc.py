"""Starting qemu-img and qemu-nbd: the one way deltavault runs qemu (backup's image
access here, restore's conversion and serve), so every child is bounded alike.

- It dies with us: the kernel sends it ``death_signal`` (SIGKILL unless said otherwise)
  when we die, SIGKILL included (``PR_SET_PDEATHSIG``, set in the child before exec). The
  signal follows the *thread* that forked the child, not the process: every qemu child is
  started from the main thread (backup and restore open, map, add bitmaps and convert there;
  serve's FUSE mount runs on a thread of its own, qemu-nbd is started from the main one),
  whose end is the process's. A child started from a thread that ends first would be killed
  then.
- A command given a wall-clock ``timeout`` also gets that many seconds of CPU time and one
  more (``RLIMIT_CPU``, soft and hard alike: SIGKILL at the bound), so a hostile image cannot
  make it spin beyond the bound even when we cannot stop it (stopped, or gone). The second
  more lets a child spinning on one thread meet its deadline first, with that reason: at
  the same bound, which came first was a race (CI: "killed (signal 9)" where the test
  expected "did not finish within 2 s").
- Its error is "in use" only when qemu says it could not take the image's lock.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import resource
import signal
import subprocess
from collections.abc import Callable
from functools import cache
from typing import IO, Any

from deltavault.errors import DeltavaultError

PR_SET_PDEATHSIG = 1
INSPECT_TIMEOUT = 120.0  # seconds for qemu-img info or map: each is bounded work, checked before it runs
IN_USE = "the image is in use: a running VM or another qemu-nbd holds it"

# qemu's words when another process holds the image (block/file-posix.c): a bare "lock"
# also matched "block" (node names such as '#block194' in bitmap errors) and file names.
# Only a conflict (EAGAIN) gets the hint and no errno; a file system that cannot lock (NFS
# without lockd: "Failed to lock byte 100: No locks available") is no one holding the image.
_LOCKED = re.compile(r'Is another process using the image|Failed to get (?:shared )?"[a-z ]+" lock(?!:)')


def in_use(message: str) -> bool:
    """Whether qemu's ``message`` says another process holds the image's lock."""
    return _LOCKED.search(message) is not None


@cache
def _prctl() -> Any:
    # Resolved in the parent: the forked child only makes the call (no dlopen after fork).
    return ctypes.CDLL(None, use_errno=True).prctl


def _child_setup(death_signal: int, cpu: int | None) -> Callable[[], None]:
    prctl, parent = _prctl(), os.getpid()

    def setup() -> None:  # in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent:  # we died before the line above: no signal would come
            os.kill(os.getpid(), signal.SIGKILL)
        if cpu is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    return setup


def cpu_bound(timeout: float | None) -> int | None:
    """The CPU seconds a child with this wall-clock timeout may use (None: no bound); never
    above the hard limit we run under (``ulimit -t``): only root may raise it, and a failed
    setrlimit in the child had been an exception, the run's end."""
    if timeout is None:
        return None
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    bound = max(1, math.ceil(timeout)) + 1
    return bound if hard == resource.RLIM_INFINITY else min(bound, hard)


def spawn(args: list[str], *, stderr: int | IO[bytes], death_signal: int = signal.SIGKILL,
          timeout: float | None = None, cwd: str | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running qemu child (qemu-nbd); OSError if it cannot be started."""
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, cwd=cwd,
                            preexec_fn=_child_setup(death_signal, cpu_bound(timeout)))


def run(args: list[str], what: str, error: type[DeltavaultError], *, timeout: float | None,
        fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run a qemu command to its end. ``error`` if it cannot start, runs past ``timeout``
    seconds (then it is killed and reaped: nothing is left running) or is killed at its CPU
    bound; a command that fails is returned for the caller to judge (``explained``)."""
    cpu = cpu_bound(timeout)
    try:
        # errors="replace": qemu's messages name files in their bytes, which need not be UTF-8
        p = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                           timeout=timeout, pass_fds=fds, preexec_fn=_child_setup(signal.SIGKILL, cpu))
    except subprocess.TimeoutExpired:
        raise error(f"{what}: did not finish within {timeout:g} s (stopped)") from None
    except OSError as exc:
        raise error(f"{what}: {exc}") from exc
    if cpu is not None and p.returncode in (-signal.SIGKILL, -signal.SIGXCPU):
        raise error(f"{what}: killed (signal {-p.returncode}); it may use {cpu} s of CPU time")
    return p


def explained(message: str) -> str:
    """What qemu said, with the reason when another process holds the image."""
    message = message.strip()
    return f"{message} ({IN_USE})" if in_use(message) else message
