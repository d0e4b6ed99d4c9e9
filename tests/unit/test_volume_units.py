"""Volume pieces without root: page sets, FIEMAP comparison, metadata-digest state."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from deltavault.tracking.volume import pagesets
from deltavault.tracking.volume.base import Rejected
from deltavault.tracking.volume.fiemap import ENCODED, UNWRITTEN, Extent, changed_ranges
from deltavault.tracking.volume.fsdigests import decode_state, encode_state


@settings(max_examples=200)
@given(st.binary(min_size=0, max_size=300), st.integers(0, 2400))
def test_set_bit_runs_match_the_bits(buf: bytes, nbits: int) -> None:
    want = [i for i in range(min(nbits, len(buf) * 8)) if buf[i >> 3] >> (i & 7) & 1]
    got = [i for s, e in pagesets.set_bit_runs(buf, nbits) for i in range(s, e)]
    assert got == want


def test_set_bit_runs_take_whole_bytes_at_once() -> None:
    buf = b"\x00" * 10 + b"\xff" * 100 + b"\x01" + b"\x00" * 5
    assert list(pagesets.set_bit_runs(buf, len(buf) * 8)) == [(80, 880), (880, 881)]


def test_add_bytes_directions() -> None:
    out, inw = BitMap(), BitMap()
    pagesets.add_bytes(out, 1000, 9000, outward=True)
    pagesets.add_bytes(inw, 1000, 9000, outward=False)
    assert list(out) == [0, 1, 2]
    assert list(inw) == [1]
    pagesets.add_bytes(inw, 4096, 4097, outward=False)
    assert list(inw) == [1]


@given(st.sets(st.integers(0, 500)), st.integers(0, 250), st.integers(0, 600))
def test_runs_cover_exactly(pages: set[int], first: int, end: int) -> None:
    bm = BitMap(pages)
    got = [p for s, e in pagesets.runs(bm, first, end) for p in range(s, e)]
    assert got == sorted(p for p in pages if first <= p < end)
    assert all(b < c for (_a, b), (c, _d) in zip(pagesets.runs(bm), pagesets.runs(bm)[1:]))


def test_dump_and_load_roundtrip() -> None:
    bm = pagesets.span(5, 100_000) | BitMap([3, 200_001])
    assert pagesets.load(pagesets.dump(bm)) == bm
    assert pagesets.load(b"") == BitMap()


def E(lo: int, ph: int, ln: int, fl: int = 0) -> Extent:
    return Extent(lo, ph, ln, fl)


def test_fiemap_same_mapping_is_unchanged_even_when_split() -> None:
    old = [E(0, 1 << 20, 1 << 20)]
    new = [E(0, 1 << 20, 8192), E(8192, 9 << 20, 4096), E(12288, (1 << 20) + 12288, (1 << 20) - 12288)]
    assert changed_ranges(old, new, 1 << 20) == [(8192, 12288)]


def test_fiemap_holes_encoded_and_unwritten() -> None:
    size = 40960
    old = [E(0, 100_000, 8192), E(16384, 200_000, 8192, ENCODED), E(32768, 300_000, 8192, UNWRITTEN)]
    new = [E(0, 100_000, 8192), E(16384, 200_000, 8192, ENCODED), E(32768, 300_000, 8192)]
    # Holes in both ([8192, 16384), [24576, 32768)) are unchanged; a compressed extent cannot
    # be compared; data written into a preallocated range changed.
    assert changed_ranges(old, new, size) == [(16384, 24576), (32768, size)]
    # A range that became a hole changed (it reads zeros now).
    assert changed_ranges([E(0, 5000, 4096)], [], 4096) == [(0, 4096)]
    assert changed_ranges([], [], 4096) == []


@settings(max_examples=100)
@given(st.integers(0, 2**31))
def test_fiemap_never_calls_a_remapped_byte_unchanged(seed: int) -> None:
    rnd = random.Random(seed)
    size = 64 * 4096
    phys_old = {p: 1000 + p for p in range(64) if rnd.random() < 0.8}
    phys_new = dict(phys_old)
    for p in range(64):
        r = rnd.random()
        if r < 0.2:
            phys_new[p] = 5000 + p  # rewritten elsewhere
        elif r < 0.25:
            phys_new.pop(p, None)  # punched

    def extents(m: dict[int, int]) -> list[Extent]:
        return [E(p * 4096, m[p] * 4096, 4096) for p in sorted(m)]

    ranges = changed_ranges(extents(phys_old), extents(phys_new), size)
    changed = {p for s, e in ranges for p in range(s // 4096, -(-e // 4096))}
    for p in range(64):
        if phys_old.get(p) != phys_new.get(p):
            assert p in changed


def test_digest_state_roundtrip_and_ownership() -> None:
    digests = {n: n.to_bytes(16, "little") for n in (2, 11, 12, 99_999)}
    blobs = encode_state("ext4", "u-1", digests)
    assert decode_state(blobs, "ext4", "u-1") == digests
    with pytest.raises(Rejected, match="belong"):
        decode_state(blobs, "ext4", "u-2")
    assert decode_state(encode_state("ntfs", "x", {}), "ntfs", "x") == {}
