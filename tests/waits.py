"""Waiting for a server the tests started: until it answers, with a deadline long enough
for a loaded 2-core machine, and a clear failure when it never does (a loop that gave up
after a few seconds and carried on made a later step fail with "connection refused")."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

DEADLINE = 60.0


def until(ready: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None = None,
          deadline: float = DEADLINE) -> None:
    """Poll ``ready`` until true; fail if ``proc`` exits first or ``deadline`` seconds pass."""
    end = time.monotonic() + deadline
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the server exited ({proc.returncode}) before it was ready")
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not ready after {deadline:.0f} s")
        time.sleep(0.02)


def unix_listening(path: Path) -> Callable[[], bool]:
    """A check that a Unix socket accepts connections (it exists from bind(), before listen())."""
    def ready() -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(str(path)) == 0
    return ready
