"""The composite scanner of a partitioned disk: what it vouches for, and what it never does."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyroaring import BitMap

from deltavault.model.volume import FsInfo
from deltavault.tracking.volume.base import Allocation, DigestScan
from deltavault.tracking.volume.partitions import KEY_SHIFT, Part, PartitionedScanner


@dataclass
class FakeFs:
    """A file system covering ``pages`` pages of a partition of ``volume`` pages. It uses
    ``used``; compared with ``prev`` it needs ``must`` read. Like the real scanners, its
    must-read set is every page of its reader minus what unchanged files vouch for."""

    pages: int
    used: BitMap
    must: BitMap
    digests: dict[int, bytes]
    distrust: str = ""
    kind: str = "ext4"
    volume: int = 0
    seen_prev: list[dict[int, bytes] | None] = field(default_factory=list)

    @property
    def info(self) -> FsInfo:
        return FsInfo(type=self.kind, uuid=f"uuid-{self.pages}")

    def allocation(self) -> Allocation:
        return Allocation(self.info, self.pages, self.used)

    def digest_scan(self, prev: dict[int, bytes] | None) -> DigestScan:
        self.seen_prev.append(prev)
        volume = self.volume or self.pages
        beyond = BitMap(range(self.pages, volume))
        return DigestScan(dict(self.digests), (BitMap(self.must) | beyond) if prev else BitMap(range(volume)))


def test_pages_outside_trusted_partitions_are_always_read() -> None:
    a = FakeFs(10, BitMap([0, 1]), BitMap([1]), {5: b"a" * 16})
    bad = FakeFs(4, BitMap(), BitMap(), {}, distrust="needs recovery")
    # disk of 40 pages: table 0-1, a at 2-11, gap 12-14, b at 15-22 (its file system covers
    # only 6 of the 8), bad at 30-33, free tail
    b_short = FakeFs(6, BitMap([0]), BitMap([0]), {5: b"b" * 16}, volume=8)
    s = PartitionedScanner(40 * 4096, [Part(1, 2, 10, a), Part(2, 15, 8, b_short), Part(3, 30, 4, bad)], [])
    assert "needs recovery" in s.skipped[0] and not s.distrust
    alloc = s.allocation().allocated
    outside = BitMap(range(0, 2)) | BitMap(range(12, 15)) | BitMap(range(23, 40))
    assert outside <= alloc  # table, gap, untrusted partition, tail of the disk
    assert BitMap([2, 3, 15]) <= alloc and 4 not in alloc and 16 not in alloc
    assert BitMap([21, 22]) <= alloc  # partition pages its file system does not cover
    first = s.digest_scan(None)
    assert first.must_read == BitMap(range(40))  # no previous digests: everything
    # keys carry the partition number: equal inode numbers in two partitions stay apart
    assert set(first.digests) == {(1 << KEY_SHIFT) | 5, (2 << KEY_SHIFT) | 5}
    later = s.digest_scan(first.digests)
    assert a.seen_prev[-1] == {5: b"a" * 16} and b_short.seen_prev[-1] == {5: b"b" * 16}
    assert later.must_read == outside | BitMap([3]) | BitMap([15]) | BitMap([21, 22])


def test_a_partition_new_since_the_last_run_is_read_whole() -> None:
    a = FakeFs(4, BitMap([0]), BitMap(), {1: b"x" * 16})
    s = PartitionedScanner(8 * 4096, [Part(7, 2, 4, a)], [])
    scan = s.digest_scan({(3 << KEY_SHIFT) | 1: b"y" * 16})  # digests of another partition only
    assert a.seen_prev[-1] is None
    assert scan.must_read == BitMap(range(8))


def test_no_trusted_partition_means_no_awareness() -> None:
    bad = FakeFs(4, BitMap(), BitMap(), {}, distrust="dirty")
    s = PartitionedScanner(8 * 4096, [Part(1, 0, 4, bad)], ["partition 2: no file system"])
    assert s.distrust.startswith("no partition it can read") and "dirty" in s.distrust
