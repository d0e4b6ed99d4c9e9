"""Recursive signatures (chunking/rdc.py) and the remote delta protocol (sync/remote.py),
the server running as a real subprocess behind a pipe, so the bytes on the wire are counted."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deltavault.chunking import rdc
from deltavault.sync.remote import fetch
from deltavault.sync.wire import Channel

MiB = 1 << 20


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_streams_recurse_until_small() -> None:
    data = rand(48 * MiB, 1)
    s = rdc.streams(data)
    assert len(s) == 3  # data, level-0 signature (~100 KB), level 1 (< 4 KiB)
    assert len(s[1]) > rdc.TOP_MAX >= len(s[2])
    assert sum(n for n, _ in rdc.parse(s[1])) == len(data)
    assert sum(n for n, _ in rdc.parse(s[2])) == len(s[1])
    assert rdc.streams(b"tiny") == [b"tiny", rdc.signature(rdc.chunks(b"tiny", 0))]


def test_plan_reuses_what_the_seed_has() -> None:
    old = rand(4 * MiB, 2)
    new = old[:MiB] + b"inserted" + old[MiB:]
    sig = rdc.signature(rdc.chunks(new, 0))
    seed = rdc.SeedIndex.of(old, 0)
    p = rdc.plan(sig, seed)
    assert 0 < sum(n for _o, n in p.missing) < 200_000  # the chunk(s) around the insertion
    fetched = [new[o:o + n] for o, n in p.missing]
    assert rdc.verify_fetched(p, fetched)
    assert b"".join(rdc.assemble(p, seed, fetched)) == new
    bad = list(fetched)
    bad[0] = bytes([bad[0][0] ^ 1]) + bad[0][1:]
    assert not rdc.verify_fetched(p, bad) and not rdc.verify_fetched(p, fetched[1:])


def test_page_mode_costs_exactly_the_changed_pages() -> None:
    old = bytearray(rand(8 * MiB + 100, 5))
    new = bytearray(old)
    for pg in (3, 700, 1500):
        new[pg * 4096 + 10] ^= 0xFF
    new[-1] ^= 1  # the short last page
    ladder = rdc.Ladder.build(bytes(new), pages=True)
    assert [c.length for c in ladder.chunks[0][-2:]] == [4096, 100]
    p = rdc.plan(ladder.streams[1], rdc.SeedIndex.of(bytes(old), 0, pages=True))
    assert p.missing == [(3 * 4096, 4096), (700 * 4096, 4096), (1500 * 4096, 4096), (2048 * 4096, 100)]


# A peer serving one file, as a sync's sender serves the file it has opened (sender/link.py),
# over a pipe to another process.
_SERVE_ONE = ("import sys; from deltavault.sync.remote import serve; from deltavault.sync.wire import Channel; "
              "data = open(sys.argv[1], 'rb').read(); serve(Channel(sys.stdin.buffer, sys.stdout.buffer), lambda: data)")


@contextmanager
def serving(path: Path) -> Iterator[Channel]:
    p = subprocess.Popen([sys.executable, "-c", _SERVE_ONE, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    chan = Channel(p.stdout, p.stdin)
    try:
        yield chan
    finally:
        chan.send({"op": "bye"})
        p.wait(timeout=30)


def test_remote_fetch_moves_only_changes(tmp_path: Path) -> None:
    old = bytearray(rand(32 * MiB, 3))
    new = bytearray(old)
    new[10 * MiB:10 * MiB] = b"x" * 1000  # an insertion shifts everything after it
    for pg in random.Random(4).sample(range(len(new) // 4096), 5):
        new[pg * 4096:pg * 4096 + 100] = os.urandom(100)
    del new[30 * MiB:30 * MiB + 5000]
    (tmp_path / "db.bin").write_bytes(new)
    with serving(tmp_path / "db.bin") as server:
        got, st = fetch(server, b"db.bin", bytes(old))
    assert got == bytes(new)
    assert st.levels == 2 and st.size == len(new)
    assert st.data_fetched < 7 * 70_000  # 7 changed places, a chunk or two each
    assert st.bytes_received < len(new) // 16, st
    # recursion: only the changed part of the 60 KB level-0 signature came over
    assert st.signature_fetched < st.signature_full // 3, st


def test_a_small_file_with_no_seed_is_fetched_whole(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"small new file")
    with serving(tmp_path / "f") as server:
        got, st = fetch(server, b"f", b"")  # no seed: everything is fetched
    assert got == b"small new file" and st.data_reused == 0


def test_remote_fetch_in_page_mode(tmp_path: Path) -> None:
    old = bytearray(rand(16 * MiB, 6))
    new = bytearray(old)
    pages = random.Random(7).sample(range(len(new) // 4096), 40)
    for pg in pages:
        new[pg * 4096 + 7] ^= 0x5A  # changed in place: one byte in each of 40 pages
    (tmp_path / "vm.img").write_bytes(new)
    with serving(tmp_path / "vm.img") as server:
        got, st = fetch(server, b"vm.img", bytes(old), pages=True)
    assert got == bytes(new)
    assert st.data_fetched == 40 * 4096 and st.data_reused == len(new) - 40 * 4096
    assert st.signature_fetched < 40 * 2 * 1024 + 4096  # a signature chunk or so per changed page
