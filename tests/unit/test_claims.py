"""The ranges of a pack the read-ahead has fetched (backends/claims.py), against a set of
bytes as the model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from deltavault.backends.claims import Claims

N = 64
_range = st.tuples(st.integers(0, N), st.integers(0, N)).map(sorted).filter(lambda r: r[0] < r[1])


@given(st.lists(st.tuples(st.booleans(), _range), max_size=12), _range)
def test_claims_match_a_set_of_bytes(ops: list[tuple[bool, list[int]]], probe: list[int]) -> None:
    c, model = Claims(), set()
    for add, (lo, hi) in ops:
        if add:
            c.add(lo, hi)
            model |= set(range(lo, hi))
        else:
            c.remove(lo, hi)
            model -= set(range(lo, hi))
        got = set()
        for a, b in c.ranges():
            assert a < b
            got |= set(range(a, b))
        assert got == model
        pairs = c.ranges()
        assert all(pairs[i][1] < pairs[i + 1][0] for i in range(len(pairs) - 1))  # disjoint, merged
    lo, hi = probe
    free = [x for x in range(lo, hi) if x not in model]
    assert c.first_free(lo, hi) == (free[0] if free else None)
    if free:
        at = free[0]
        below = [x + 1 for x in model if x < at]
        assert c.end_below(at) == (max(below) if below else 0)
        above = [x for x in model if x > at]
        assert c.start_above(at) == (min(above) if above else None)
