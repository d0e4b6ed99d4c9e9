"""NTFS streams against hostile users. Of any size, held in bounded memory: the real CLI
under the suite's memory limit (tests/memlimit.py, 143 MiB), a stream made huge by a sparse
truncate (it costs its owner nothing on ntfs-3g). Locally and over the suite's sshd."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from tests.conftest import needs_root, needs_tools
from tests.integration.ntfs.ntfsutil import ntfs, streams_of
from tests.integration.ntfs.test_ntfs_sync import BIG, populate
from tests.integration.sync.conftest import REMOTE, dv, summary
from tests.memlimit import MemoryLimit
from tests.sshd import Server, missing_tools, sshd

pytestmark = [needs_root(), needs_tools("mkntfs", "ntfs-3g", "getfattr"), pytest.mark.root]

HUGE = 3 << 30  # over DELTA_MAX (2 GiB): more than remote delta may hold


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with sshd(tmp_path) as srv:
        yield srv


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    e.update(extra)
    return e


def digest(path: Path) -> bytes:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


# The stream's owner truncates it to HUGE right after the sender opens it for reading, and
# back to its size once the sender closes it (the one open only, for the old code to end).
GROW = """
import os, runpy
real_open, real_close, grown = os.open, os.close, {}
def open_(path, flags, mode=0o777, *, dir_fd=None):
    fd = real_open(path, flags, mode, dir_fd=dir_fd)
    if not flags & os.O_PATH and flags & os.O_ACCMODE == os.O_RDONLY and not grown:
        where = os.readlink(f"/proc/self/fd/{fd}")
        if where.endswith("doc.txt:big"):
            grown[fd] = (where, os.stat(where).st_size)
            os.truncate(where, HUGE)
    return fd
def close_(fd):
    where, size = grown.get(fd, (None, 0))
    if where is not None:
        os.truncate(where, size)
        grown[fd] = (None, 0)
    real_close(fd)
os.open, os.close = open_, close_
runpy.run_module("deltavault", run_name="__main__", alter_sys=True)
""".replace("HUGE", str(HUGE))


@pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")
def test_stream_grown_past_delta_max_is_not_loaded_for_a_delta(server: Server, tmp_path: Path,
                                                                 memory_limit: MemoryLimit) -> None:
    """The agent asks for a remote delta of a stream listed at 5 MiB; by the time the sender
    opens it, it is 3 GiB. The sender loaded whatever size it found (the file's own data
    falls back to a whole send past DELTA_MAX): 3 GiB in memory, killed under the limit. Now
    it tells the agent the file changed, and sends it again: the stream goes by delta."""
    with ntfs(tmp_path, "src") as src, ntfs(tmp_path, "dst") as dst:
        populate(src)
        e = env(DELTAVAULT_SSH_CONFIG=str(server.ssh_config))
        args = ["--json", "sync", "--remote-command", REMOTE, "--acl", "--streams", str(src / "data"),
                f"dvtest:{dst / 'data'}"]
        r = dv(*args, env=e)
        assert r.returncode == 0, r.stdout + r.stderr
        with open(src / "data" / "doc.txt:big", "r+b") as f:
            f.seek(BIG // 2)
            f.write(os.urandom(4096))
        r = memory_limit.run([sys.executable, "-c", GROW, *args], env=e, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        s = summary(r)
        assert s["problems"] == [] and 0 < s["delta_wire_bytes"] < BIG, s
        assert os.stat(src / "data" / "doc.txt:big").st_size == BIG  # (the owner's step ran, and was undone)
        want = streams_of(src / "data" / "doc.txt")
    with ntfs(tmp_path, "dst") as dst:  # (afresh: the kernel keeps pages of name:stream past a rename)
        assert streams_of(dst / "data" / "doc.txt") == want


def test_huge_directory_stream_is_copied_in_bounded_memory(tmp_path: Path, memory_limit: MemoryLimit) -> None:
    """A directory's stream of 192 MiB (locally onto ntfs-3g any size goes): it was read
    whole into memory, twice over, and the sync killed under the limit. Now it is copied
    through the sync's buffer, and compared so when it is there already."""
    size = 192 << 20
    with ntfs(tmp_path, "src", size="512M") as src, ntfs(tmp_path, "dst", size="512M") as dst:
        d = src / "data" / "sub"
        d.mkdir(parents=True)
        stream = Path(f"{d}:huge")
        stream.write_bytes(os.urandom(4096))
        with open(stream, "r+b") as f:
            f.truncate(size)
            f.seek(size - 4096)
            f.write(os.urandom(4096))
        args = [sys.executable, "-m", "deltavault", "--json", "sync", "--streams", str(src / "data"),
                str(dst / "data")]
        for change in (False, True, False):
            if change:
                with open(stream, "r+b") as f:
                    f.seek(size // 2)
                    f.write(b"changed")
            r = memory_limit.run(args, env=env(), text=True, timeout=600)
            assert r.returncode == 0 and summary(r)["problems"] == [], r.stdout + r.stderr
            copy = Path(f"{dst / 'data' / 'sub'}:huge")
            assert os.stat(copy).st_size == size and digest(copy) == digest(stream), change
