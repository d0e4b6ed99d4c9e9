"""The memory limit of the crash and corruption tests (tests/memlimit.py) is enforced: a
process over it is killed by the kernel and the check after it fails; one under it passes
with its peak recorded. So the limit cannot silently stop being in force."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_root
from tests.memlimit import LIMIT_BYTES, MemoryLimit, MemoryLimitExceeded

pytestmark = needs_root()

# Touches every page of n bytes (a bytes object filled by multiplication is written).
ALLOCATE = "import sys; b = b'x' * int(sys.argv[1]); print(len(b))"


@pytest.fixture
def own_limit() -> Iterator[MemoryLimit]:
    """A second session's cgroup with a smaller limit (the processes here need less)."""
    m = MemoryLimit.for_session(64 * 2**20)
    assert m.session is not None, m.describe()
    yield m
    m.close()
    assert not m.session.exists()


def process_cgroups(m: MemoryLimit) -> list[Path]:
    assert m.session is not None
    return [p for p in m.session.iterdir() if p.is_dir()]


def test_the_session_limit_is_in_force_as_root(memory_limit: MemoryLimit) -> None:
    assert memory_limit.in_force, memory_limit.describe()
    assert memory_limit.limit == LIMIT_BYTES
    p = memory_limit.run([sys.executable, "-c", "print(open('/proc/self/cgroup').read())"], text=True)
    assert p.returncode == 0
    assert "dv-memlimit-" in p.stdout, p.stdout  # the process ran in a cgroup of its own


def test_a_process_over_the_limit_is_killed_and_fails_the_check(own_limit: MemoryLimit) -> None:
    with pytest.raises(MemoryLimitExceeded, match="oom_kill"):
        own_limit.run([sys.executable, "-c", ALLOCATE, str(3 * own_limit.limit)])
    # Also when the caller waits for the process itself (the crash trials' Popen).
    p = own_limit.popen([sys.executable, "-c", ALLOCATE, str(2 * own_limit.limit)])
    p.wait()
    with pytest.raises(MemoryLimitExceeded):
        own_limit.finish(p)
    assert process_cgroups(own_limit) == []  # each process's cgroup went with it


def test_a_process_under_the_limit_passes_and_its_peak_is_recorded(own_limit: MemoryLimit) -> None:
    want = own_limit.limit // 3
    p = own_limit.run([sys.executable, "-c", ALLOCATE, str(want)], text=True)
    assert p.returncode == 0 and p.stdout.strip() == str(want)
    (peak,) = own_limit.peaks.values()
    assert want < peak.bytes <= own_limit.limit
    assert ALLOCATE in peak.command
