"""Mount test helpers: ``deltavault mount`` and ``deltavault serve`` as real processes,
always stopped and unmounted, and trees with every kind of metadata."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.conftest import Cli
from tests.loopdev import run


def _mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


class Daemon:
    """A long-running deltavault command, waited for until it prints a line of ``ready``."""

    def __init__(self, cli: Cli, args: list[str], ready: str, timeout: float = 60,
                 log: Path | None = None, cwd: Path | None = None) -> None:
        # A long log (--debug-fuse) goes to a file: a full pipe would stop the daemon.
        self.log = log
        with ExitStack() as files:
            err = subprocess.PIPE if log is None else files.enter_context(open(log, "w"))
            self.proc = subprocess.Popen([sys.executable, "-m", "deltavault", "--json", *args], env=cli.env,
                                         stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd)
        self.lines: list[dict] = []
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                self.stop()
                raise AssertionError(f"deltavault {' '.join(args)} never got ready: {self.stderr()}")
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"deltavault {' '.join(args)} exited {self.proc.wait()}: {self.stderr()}")
            if line.startswith("{"):
                self.lines.append(json.loads(line))
                if self.lines[-1].get("type") == ready:
                    return

    @property
    def ready(self) -> dict:
        return self.lines[-1]

    def stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        if self.log is not None:
            self.proc.wait()
            return self.log.read_text(errors="replace")
        return self.proc.stderr.read() if self.proc.stderr else ""

    def signal(self, sig: int, timeout: float = 30) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


@contextmanager
def mount_daemon(cli: Cli, mnt: Path, *args: str, log: Path | None = None,
                 cwd: Path | None = None) -> Iterator[Daemon]:
    """``deltavault mount MNT ARGS`` running (in ``cwd`` if given); unmounted and stopped
    whatever happens. Its stderr goes to ``log`` if given."""
    mnt.mkdir(exist_ok=True)
    d = Daemon(cli, ["mount", str(mnt), *args], "mounted", log=log, cwd=cwd)
    try:
        yield d
    finally:
        d.stop()
        if _mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@contextmanager
def mounted(cli: Cli, mnt: Path, *args: str, log: Path | None = None, cwd: Path | None = None) -> Iterator[Path]:
    """``mount_daemon``, for a test that needs only the mount point."""
    with mount_daemon(cli, mnt, *args, log=log, cwd=cwd):
        yield mnt


def leave_by_signal(d: Daemon, mnt: Path, sig: int) -> None:
    """``sig`` (Ctrl-C, or a service stopped) ends the mount cleanly: exit 0 with its
    summary, and the mount gone."""
    assert _mounted(mnt)
    rc, out, err = d.signal(sig)
    assert rc == 0, err
    assert '"type": "summary"' in out
    assert not _mounted(mnt)


@contextmanager
def serving(cli: Cli, *args: str) -> Iterator[str]:
    """``deltavault serve ARGS`` running; yields the NBD URI."""
    d = Daemon(cli, ["serve", *args], "serving")
    try:
        yield d.ready["uri"]
    finally:
        d.stop()


def _ours() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        found = [line.split()[4] for line in f if "/dv-mount-" in line or "/dv-fs-" in line]
    return found + [x for x in run("losetup", "-a").splitlines() if "/dv-mount-" in x]


# What a run killed earlier on this machine left (a SIGKILLed mount stays): not this run's.
_BEFORE = frozenset(_ours())


def leftovers() -> list[str]:
    """Mounts and loop devices our commands made in this test run, if any is left."""
    return [x for x in _ours() if x not in _BEFORE]
