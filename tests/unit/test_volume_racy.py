"""Which objects a metadata-digest scan may not vouch for next time (tracking/volume/racy.py)."""

from __future__ import annotations

from deltavault.tracking.volume.racy import Racy


def test_objects_changed_within_a_second_of_the_newest_time_are_racy_whatever_the_order() -> None:
    r = Racy([900], now=2000)
    for obj, ctime in [(1, 1000), (2, 999), (3, 1500), (4, 1499), (5, 998), (6, 1498), (7, 1500)]:
        r.see(obj, ctime)
    assert sorted(r.objects()) == [3, 4, 7]


def test_the_superblock_times_count_as_the_newest_and_times_ahead_of_the_clock_are_racy() -> None:
    r = Racy([1200, 5000], now=2000)  # 5000: stamped by a clock that was ahead
    for obj, ctime in [(1, 1199), (2, 1000), (3, 3000)]:
        r.see(obj, ctime)
    assert sorted(r.objects()) == [1, 3]
