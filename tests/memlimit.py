"""Run deltavault's processes under a hard memory limit: the crash and corruption tests.

Every process started through ``MemoryLimit`` gets a fresh cgroup of its own (a child of one
cgroup made for the test session), with a memory limit of ``LIMIT_BYTES`` and no swap, so
a run that needs more is killed by the kernel's OOM killer instead of slowing down. After
the process, ``finish`` reads the cgroup's OOM counters and fails the test if the kernel
had to kill (or reclaim at the limit and find nothing, ``oom``), and records the cgroup's
peak (what the kernel charged: the process tree's memory plus page cache it touched).

cgroup v2 (``memory.max``, ``memory.swap.max``, ``memory.events``, ``memory.peak``) is used
when its hierarchy has the memory controller; otherwise the v1 memory controller
(``memory.limit_in_bytes``, ``memory.memsw.limit_in_bytes``, ``memory.oom_control``,
``memory.max_usage_in_bytes``), as on a hybrid host where v1 holds that controller. Run as
root with either mounted writable, the limit must be in force: failing to set it up is an
error, not a silent fallback. Otherwise (not root, no memory controller, read-only
hierarchy) the processes run without the limit and ``reason`` says why.

Only the processes started here are limited: the test servers (SeaweedFS, sshd) and the
test process itself are not.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The documented bound (issue #18, docs/benchmarks.md "Memory"): peak RSS of at most 150 MB
# (143 MiB) with the default settings. docs/reliability.md says why the tests use it.
LIMIT_BYTES = 150_000_000
_SESSIONS = itertools.count(1)


class MemoryLimitExceeded(AssertionError):
    """A process started under the limit needed more memory than the limit allows."""


def _mounts() -> list[tuple[str, Path, str, str]]:
    """(filesystem type, mount point, super options, the cgroup mounted there) of each
    cgroup hierarchy mounted."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, _src, opts = [*post.split(" "), "", ""][:3]
        if fstype in ("cgroup", "cgroup2"):
            fields = pre.split(" ")
            out.append((fstype, Path(fields[4]), opts, fields[3]))
    return out


def _own_cgroup(match: Callable[[str], bool], mounted: str) -> str:
    """This process's cgroup in the hierarchy whose controller list ``match`` accepts,
    relative to the cgroup ``mounted`` at the mount point."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        if match(controllers) and Path(path).is_relative_to(mounted):
            return str(Path(path).relative_to(mounted))
    return ""


@dataclass
class _Hierarchy:
    """The files of one cgroup version's memory controller."""

    version: int
    parent: Path  # where the session's cgroup is made

    def make(self, path: Path, limit: int | None) -> None:
        path.mkdir()
        if self.version == 2:
            if limit is None:
                (path / "cgroup.subtree_control").write_text("+memory")
                return
            (path / "memory.max").write_text(str(limit))
            swap = path / "memory.swap.max"  # absent when the kernel does not account swap
            if swap.exists():
                swap.write_text("0")
            elif len(Path("/proc/swaps").read_text().splitlines()) > 1:
                raise OSError(f"swap is on and {path} cannot keep processes out of it")
            return
        if limit is not None:
            (path / "memory.limit_in_bytes").write_text(str(limit))
            memsw = path / "memory.memsw.limit_in_bytes"  # memory + swap: equal means no swap
            if memsw.exists():
                memsw.write_text(str(limit))
            (path / "memory.swappiness").write_text("0")

    def ooms(self, path: Path) -> dict[str, int]:
        if self.version == 2:
            pairs = (line.split() for line in (path / "memory.events").read_text().splitlines())
            return {k: int(v) for k, v in pairs if k in ("oom", "oom_kill")}
        pairs = (line.split() for line in (path / "memory.oom_control").read_text().splitlines())
        return {k: int(v) for k, v in pairs if k == "oom_kill"}

    def peak(self, path: Path) -> int | None:
        f = path / ("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        return int(f.read_text()) if f.exists() else None


def _find() -> tuple[_Hierarchy | None, str]:
    """The hierarchy to use, or None and why not."""
    mounts = _mounts()
    for fstype, mnt, _opts, _root in mounts:
        if fstype == "cgroup2" and "memory" in (mnt / "cgroup.controllers").read_text().split():
            # The session's cgroup goes at the root, the one cgroup exempt from "no processes
            # in a cgroup that gives controllers to its children".
            return _checked(_Hierarchy(2, mnt))
    for fstype, mnt, opts, root in mounts:
        if fstype == "cgroup" and "memory" in opts.split(","):
            own = _own_cgroup(lambda c: "memory" in c.split(","), root)
            return _checked(_Hierarchy(1, mnt / own))
    return None, "no cgroup hierarchy here has the memory controller"


def _checked(h: _Hierarchy) -> tuple[_Hierarchy | None, str]:
    if os.geteuid() != 0:
        return None, f"not root: cannot make cgroups under {h.parent}"
    if not os.access(h.parent, os.W_OK):
        return None, f"{h.parent} is not writable (a read-only cgroup mount)"
    if h.version == 2:
        root = h.parent / "cgroup.subtree_control"
        if "memory" not in root.read_text().split():
            root.write_text("+memory")
    return h, ""


@dataclass
class Peak:
    """The largest peak of one test file's processes, and the command that reached it."""

    bytes: int
    command: str


@dataclass
class _Started:
    argv: list[str]
    cgroup: Path
    test: str


@dataclass
class MemoryLimit:
    """One per test session: ``popen``/``run`` start a process under the limit,
    ``finish`` checks it afterwards. ``peaks`` holds the largest peak per test file."""

    limit: int = LIMIT_BYTES
    reason: str = ""
    peaks: dict[str, Peak] = field(default_factory=dict)
    runs: int = 0
    _hier: _Hierarchy | None = None
    session: Path | None = None  # the session's cgroup, parent of each process's
    _started: dict[int, _Started] = field(default_factory=dict)

    @classmethod
    def for_session(cls, limit: int = LIMIT_BYTES) -> MemoryLimit:
        hier, reason = _find()
        m = cls(limit, reason, _hier=hier)
        if hier is not None:
            m.session = hier.parent / f"dv-memlimit-{os.getpid()}-{next(_SESSIONS)}"
            hier.make(m.session, None)
        return m

    @property
    def in_force(self) -> bool:
        return self.session is not None

    def describe(self) -> str:
        if self._hier is None or self.session is None:
            return f"memory limit NOT in force ({self.reason}): processes ran unlimited"
        return (f"memory limit in force: {self.limit:,} bytes ({self.limit / 2**20:.0f} MiB), "
                f"no swap, cgroup v{self._hier.version} under {self.session.parent}")

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in a fresh cgroup of its own under the limit (plain Popen when
        the limit is not in force); call ``finish`` once it has been waited for."""
        if self._hier is None or self.session is None:
            return subprocess.Popen(argv, **kw)
        self.runs += 1
        cg = self.session / f"p{self.runs}"
        self._hier.make(cg, self.limit)
        procs = str(cg / "cgroup.procs")

        def enter() -> None:  # in the child, before exec: only system calls, no locks
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)

        try:
            p = subprocess.Popen(argv, preexec_fn=enter, **kw)
        except BaseException:
            cg.rmdir()
            raise
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[0]
        self._started[p.pid] = _Started(list(argv), cg, test)
        return p

    def finish(self, p: subprocess.Popen[Any]) -> int | None:
        """After ``p`` ended: its cgroup's peak (None without the limit, or without a peak
        file); MemoryLimitExceeded if the kernel hit the limit with nothing to reclaim."""
        started = self._started.pop(p.pid, None)
        if started is None or self._hier is None:
            return None
        cg = started.cgroup
        try:
            ooms = self._hier.ooms(cg)
            peak = self._hier.peak(cg)
        finally:
            _remove(cg)
        best = self.peaks.get(started.test)
        if peak is not None and (best is None or peak > best.bytes):
            self.peaks[started.test] = Peak(peak, " ".join(started.argv[1:])[:120])
        if any(ooms.values()):
            raise MemoryLimitExceeded(
                f"{started.argv[1:]} exceeded the memory limit of {self.limit:,} bytes: "
                f"{ooms}, peak {peak}, exit status {p.returncode}")
        return peak

    def run(self, argv: list[str], *, input: str | bytes | None = None, timeout: float | None = None,
            **kw: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run with capture, under the limit, checked."""
        with self.popen(argv, stdin=subprocess.PIPE if input is not None else None,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw) as p:
            try:
                out, err = p.communicate(input, timeout=timeout)
            except BaseException:
                p.kill()
                p.wait()
                self.finish(p)
                raise
        self.finish(p)
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    def close(self) -> None:
        """Remove the session's cgroup (each process's was removed by ``finish``)."""
        for started in self._started.values():
            _remove(started.cgroup)
        self._started.clear()
        if self.session is not None:
            _remove(self.session)


def _remove(cg: Path) -> None:
    """Remove a process's cgroup once empty. What the process left running in it (a helper
    it started, orphaned by SIGKILL) is the test's own and is killed after a grace period."""
    deadline = time.monotonic() + 10
    while True:
        try:
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
        for child in cg.iterdir():
            if child.is_dir():
                _remove(child)
        if time.monotonic() > deadline - 5:
            for pid in (cg / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
