"""A restore's plan of reads (repository/plan.py) and a read-ahead following it
(backends/readahead.py, backends/remnants.py): packs with no planned read go first, then the
furthest; a dropped pack's planned ranges are kept and served without a GET."""

from __future__ import annotations

import os
import threading

from deltavault.backends.base import Forwarding
from deltavault.backends.readahead import ReadAheadBackend
from deltavault.repository.plan import ReadPlan
from deltavault.testing.memory import MemoryBackend

MiB = 1024 * 1024


class _Gets(Forwarding):
    def __init__(self, inner: MemoryBackend) -> None:
        super().__init__(inner)
        self.gets: list[tuple[str, int, int]] = []

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(name, offset, length)
        self.gets.append((name, offset, len(data)))
        return data


def _plan(blobs: dict[bytes, tuple[str, int, int]]) -> ReadPlan:
    return ReadPlan(blobs.get, gap=100)


def test_next_use_follows_the_plan_and_reads() -> None:
    plan = _plan({b"a": ("data/p", 0, 10), b"b": ("data/q", 0, 10), b"c": ("data/p", 500, 10)})
    assert plan.next_use("data/p") == -1  # not named yet
    plan.add([b"a", b"b", b"c"])
    assert (plan.next_use("data/p"), plan.next_use("data/q")) == (0, 1)
    plan.read(b"a")
    assert plan.next_use("data/p") == 2
    assert plan.ranges("data/p") == [(500, 510)]
    plan.read(b"c")
    assert plan.next_use("data/p") is None


def test_a_blob_read_before_the_walk_planned_it_is_not_planned() -> None:
    plan = _plan({b"a": ("data/p", 0, 10)})
    plan.read(b"a")  # the restore went first
    plan.add([b"a"])
    assert plan.next_use("data/p") is None


def test_ranges_join_reads_closer_than_the_gap() -> None:
    plan = _plan({b"a": ("data/p", 0, 10), b"b": ("data/p", 50, 10), b"c": ("data/p", 400, 10)})
    plan.add([b"c", b"a", b"b"])
    assert plan.ranges("data/p") == [(0, 60), (400, 410)]


def test_a_full_plan_waits_for_reads_and_close_ends_the_wait() -> None:
    plan = ReadPlan({b"a": ("data/p", 0, 1), b"b": ("data/p", 1, 1), b"c": ("data/p", 2, 1)}.get, gap=0, ahead=1)
    plan.add([b"a"])
    assert plan.full()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(plan.add([b"b"])))
    t.start()
    plan.read(b"a")  # room: the walk goes on
    t.join(10)
    assert got == [True]
    t = threading.Thread(target=lambda: got.append(plan.add([b"c"])))
    t.start()
    plan.close()
    t.join(10)
    assert got == [True, False]


def test_a_dropped_pack_keeps_its_planned_ranges_and_serves_them_without_a_get() -> None:
    store = MemoryBackend()
    packs = {f"data/{i}": os.urandom(4 * MiB) for i in range(4)}
    for name, data in packs.items():
        store.put(name, data)
    gets = _Gets(store)
    ra = ReadAheadBackend(gets, block=8 * MiB, keep=9 * MiB)
    plan = _plan({b"x": ("data/0", 3 * MiB, 1000), b"y": ("data/3", 0, 1000)})
    assert ra.follow(plan)
    plan.add([b"y", b"x"])  # data/0 read again last
    assert ra.get("data/0", 0, 1000) == packs["data/0"][:1000]  # fetched whole
    for name in ("data/1", "data/2", "data/3"):  # past the budget: data/0 is dropped
        assert ra.get(name, 0, 1000) == packs[name][:1000]
    assert ra.get("data/0", 3 * MiB, 1000) == packs["data/0"][3 * MiB:3 * MiB + 1000]
    assert [(n, o) for n, o, _l in gets.gets].count(("data/0", 0)) == 1
    assert len(gets.gets) == 4  # one GET per pack, data/0's later read from what was kept
    assert ra.peak <= 9 * MiB
