"""The receiver's seed for a remote delta (DST's older version of a file) is read to the
size it had when judged, not to EOF: the real CLI pulling through the suite's sshd, under
the suite's memory limit (tests/memlimit.py, 143 MiB)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_root
from tests.integration.sync.conftest import REMOTE, dv, summary
from tests.memlimit import MemoryLimit
from tests.sshd import Server, missing_tools, sshd

pytestmark = [needs_root(), pytest.mark.root,
              pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")]

MiB = 1 << 20

# The owner of DST's db.img truncates it to 3 GiB (sparse: one system call) right after the
# receiver opens it for reading, once.
EXTEND = """
import os, runpy
real, done = os.open, []
def open_(path, flags, mode=0o777, *, dir_fd=None):
    fd = real(path, flags, mode, dir_fd=dir_fd)
    if not done and not flags & os.O_PATH and flags & os.O_ACCMODE == os.O_RDONLY:
        where = os.readlink(f"/proc/self/fd/{fd}")
        if where.endswith("/dst/db.img"):
            done.append(where)
            os.truncate(where, 3 << 30)
    return fd
os.open = open_
runpy.run_module("deltavault", run_name="__main__", alter_sys=True)
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with sshd(tmp_path) as srv:
        yield srv


def test_a_seed_extended_after_it_was_opened_is_read_to_its_size_then(server: Server, tmp_path: Path,
                                                                       memory_limit: MemoryLimit) -> None:
    """A pull of a changed 8 MiB file by remote delta: DST's older version is its seed, and
    its owner truncates it to 3 GiB once the receiver has opened it. The receiver read the
    seed to EOF: 3 GiB in memory, killed under the limit. Now it reads the 8 MiB it had
    when its handle was taken, and the file is rebuilt from them."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    old = os.urandom(8 * MiB)
    (src / "db.img").write_bytes(old)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env["DELTAVAULT_SSH_CONFIG"] = str(server.ssh_config)
    args = ["--json", "sync", "--remote-command", REMOTE, f"dvtest:{src}", str(dst)]
    r = dv(*args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    new = old[:4 * MiB] + os.urandom(4096) + old[4 * MiB:]
    (src / "db.img").write_bytes(new)
    r = memory_limit.run([sys.executable, "-c", EXTEND, *args], env=env, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(r)
    assert s["problems"] == [] and s["files_delta"] == 1 and s["delta_wire_bytes"] < MiB, s
    assert (dst / "db.img").read_bytes() == new
