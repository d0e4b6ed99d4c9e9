"""Push sync of a SRC that its owner changes between the listing of a file and its read,
the sender running in this process (so that the change is made at a known point, by
wrapping the call the sender makes next: no timing), the agent through a real sshd."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

import deltavault.sync.sender.files as files_mod
import deltavault.sync.sender.source as source_mod
from deltavault.sync.options import SyncOptions
from deltavault.sync.push import PushSyncer
from deltavault.sync.report import SyncResult
from deltavault.sync.ssh import RemotePath
from tests.conftest import needs_root
from tests.hostileutil import before_call
from tests.integration.sync.conftest import REMOTE, write
from tests.sshd import Server, missing_tools, sshd

pytestmark = [needs_root(), pytest.mark.root,
              pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")]

MiB = 1 << 20


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    with sshd(tmp_path) as srv:
        monkeypatch.setenv("DELTAVAULT_SSH_CONFIG", str(srv.ssh_config))
        yield srv


def push(src: Path, dst: Path, opts: SyncOptions) -> SyncResult:
    return PushSyncer(src, RemotePath("dvtest", str(dst)), opts, remote=REMOTE).run()


def test_a_file_grown_past_the_delta_limit_after_its_listing_is_streamed_not_loaded(
        server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent asks for a changed file by remote delta when the sizes listed are under
    DELTA_MAX; the sender then held the file it opened in memory whole, at whatever size it
    had by then. Its owner truncating it to 1 TiB in between (sparse: one system call) made
    root's sender allocate 1 TiB (MemoryError, the run lost) or, under the limit of the
    machine, read it all into memory. Now a file opened larger than DELTA_MAX goes whole,
    streamed in buffers, holes as lengths. DELTA_MAX is lowered to 16 MiB here so that the
    old behaviour shows without gigabytes: the sender's traced peak stays under it."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    old = os.urandom(MiB)
    write(src / "db.img", old)
    opts = SyncOptions(delta_min=64 * 1024)
    assert not push(src, dst, opts).problems
    write(src / "db.img", old + os.urandom(4096))  # changed: the agent will ask for a delta
    monkeypatch.setattr(files_mod, "DELTA_MAX", 16 * MiB)
    tail = os.urandom(4096)

    def grow() -> None:  # the owner's step, after the listing, before the sender opens it
        with open(src / "db.img", "r+b") as f:
            f.truncate(64 * MiB)
            f.seek(40 * MiB)
            f.write(tail)

    before_call(monkeypatch, source_mod, "open_source", b"db.img", grow)
    tracemalloc.start()
    try:
        res = push(src, dst, opts)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, peak
    assert not res.problems, res.problems
    assert res.stats.files_delta == 0 and res.stats.files_updated == 1
    got = (dst / "db.img").read_bytes()
    assert len(got) == 64 * MiB and got == (src / "db.img").read_bytes()
    assert os.stat(dst / "db.img").st_blocks * 512 < 8 * MiB  # its hole stayed one


def test_a_file_extended_without_end_while_its_digest_is_read_is_read_to_its_size_at_open(
        server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of DST's size with another mtime is compared by digest first. The sender read
    it until EOF, so an owner extending it faster than it is read (a truncate to a larger
    size costs one system call; the zeros cost the reader a read each) kept root's sync
    reading for ever. Now the digest stops at the size the file had when opened, the file
    that changed meanwhile matches nothing, and it is sent: DST ends as SRC stands. The
    owner's step runs before each read of the digest; it stops after 64, for the old code
    to end at all."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(3 * MiB + 100)
    write(src / "f", data)
    opts = SyncOptions()  # 1 MiB buffers: the digest of f takes 4 reads
    assert not push(src, dst, opts).problems
    os.utime(src / "f", ns=(0, 10**18))  # another mtime, same size: the agent asks for a digest
    real = files_mod.read_source
    reads: list[int] = []

    def extend_then_read(fd: int, buf: memoryview, offset: int) -> int:
        reads.append(offset)
        if len(reads) <= 64:
            with open(src / "f", "r+b") as f:
                f.truncate(os.fstat(f.fileno()).st_size + 4 * MiB)
        return real(fd, buf, offset)

    monkeypatch.setattr(files_mod, "read_source", extend_then_read)
    res = push(src, dst, opts)
    assert len(reads) == 4, len(reads)
    assert not res.problems, res.problems
    assert res.stats.files_updated == 1
    assert (dst / "f").read_bytes() == (src / "f").read_bytes() == data + bytes(16 * MiB)
