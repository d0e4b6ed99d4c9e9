"""pagesets.runs: runs of a page set found with set operations, equal to walking its pages."""

from __future__ import annotations

import random

from pyroaring import BitMap

from deltavault.tracking.volume import pagesets


def walked(bm: BitMap, first: int, end: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in sorted(bm):
        if first <= p < end:
            if out and out[-1][1] == p:
                out[-1] = (out[-1][0], p + 1)
            else:
                out.append((p, p + 1))
    return out


def test_runs_equal_a_walk_of_the_pages() -> None:
    rnd = random.Random(7)
    for _ in range(200):
        bm = BitMap()
        for _ in range(rnd.randrange(0, 12)):
            a = rnd.randrange(0, 300_000)
            bm.add_range(a, a + rnd.randrange(1, 70_000))
        bm.update(rnd.randrange(0, 400_000) for _ in range(rnd.randrange(0, 30)))
        first = rnd.choice([0, rnd.randrange(0, 400_000)])
        end = rnd.choice([pagesets.MAX_PAGES, rnd.randrange(first, 500_000)])
        assert pagesets.runs(bm, first, end) == walked(bm, first, end)


def test_runs_at_the_edges_of_the_page_numbers() -> None:
    assert pagesets.runs(BitMap()) == []
    top = pagesets.MAX_PAGES
    bm = pagesets.span(0, 3) | pagesets.span(top - 2, top)
    assert pagesets.runs(bm) == [(0, 3), (top - 2, top)]
    assert pagesets.runs(bm, 1, top - 1) == [(1, 3), (top - 2, top - 1)]
    # Two billion pages (8 TiB of holes) in one run, not walked one by one.
    assert pagesets.runs(pagesets.span(5, 1 << 31)) == [(5, 1 << 31)]
