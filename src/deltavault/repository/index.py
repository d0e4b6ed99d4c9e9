"""The in-memory blob index: blob id -> (pack, offset, length, type).

Each blob is one fixed-size record in a bucketed byte array, to keep a large repository's
index small. The files it is built from are indexfile.py's.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from deltavault.model.types import ID_LEN, BlobType
from deltavault.repository.pack import PackEntry


@dataclass(frozen=True, slots=True)
class BlobLocation:
    pack_id: bytes
    offset: int
    length: int
    type: BlobType


# One fixed-size record per blob: id | pack number | offset | length | raw length | type | seq.
# Records live in append-only buckets, a power of two of them, chosen by the leading bits of
# the id, and are found with bytes.find (C speed); about 60 bytes per blob instead of ~230
# for dicts of objects. The bucket count grows with the index, so a bucket holds about
# SIZE_AT records however large the index is (docs/design.md, "The in-memory index").
_REC = struct.Struct("<32sIQIIBI")
_RS = _REC.size
MIN_BITS, MAX_BITS = 10, 28  # 1,024 buckets at least; 2^28 at most (positions are u32: 4G records)
# Fewer, larger buckets cost less memory: at 10M blobs, 2^19 buckets of about 19 records
# held 89 bytes a blob (RSS), 2^18 of about 38 held 73, as 65,536 of 153 did (bench/index_table.py).
SIZE_AT = 48  # a table sized for N records has at least N / SIZE_AT buckets ...
GROW_AT = 96  # ... and is rebuilt, 4x larger, when it holds more than GROW_AT a bucket
RECORD_FORMAT, RECORD_SIZE = _REC.format, _RS  # for indexcache.py
_ENDS = struct.Struct("<32xIQI9x")  # a record's pack number, offset and length only

_Table = tuple[int, list[bytearray | None]]  # (shift: 32 - bits, buckets)


def bits_for(records: int, size_at: int = SIZE_AT) -> int:
    """The bucket count (as bits) of a table sized for ``records``."""
    bits = MIN_BITS
    while bits < MAX_BITS and records > size_at << bits:
        bits += 1
    return bits


def valid_bucket_count(count: int) -> bool:
    return count & (count - 1) == 0 and 1 << MIN_BITS <= count <= 1 << MAX_BITS


def _holds(bucket: bytearray, pack_no: bytes) -> bool:
    """Whether a record of ``bucket`` has the pack number ``pack_no`` (4 bytes, LE)."""
    pos = bucket.find(pack_no, 32)
    while pos >= 0:
        if pos % _RS == 32:
            return True
        pos = bucket.find(pack_no, pos + 1)
    return False


class Index:
    """Thread-safe for concurrent lookups and adds. Each blob also gets a dense position
    (0..len-1, in insertion order) so callers can keep per-blob marks in a bitmap.

    Adds (and growth, which an add makes) hold ``_lock``; lookups take no lock. Buckets are
    append-only, so a lookup's hit is always a record that was added, and its miss is true
    unless the table grew meanwhile: growth moves each bucket's records into the new table
    and drops the old bucket at once (so the peak is the index and one bucket, not two
    indexes), then swaps the table whole. ``_gen`` is odd while it runs; a miss that saw
    ``_gen`` odd or changed is looked up again under the lock, in the new table."""

    def __init__(self, expected: int = 0) -> None:
        self._packs: list[bytes] = []
        self._pack_no: dict[bytes, int] = {}
        # Per pack number, the end of its furthest blob in the index: a pack listed shorter
        # is truncated (``drop``). None: not known yet (read from an old local copy).
        self._ends: list[int] | None = []
        self.size_at, self.grow_at = SIZE_AT, GROW_AT
        self._set_table(bits_for(expected, self.size_at), [])
        self._n = 0
        self._gen = 0
        self._lock = threading.Lock()

    def _set_table(self, bits: int, buckets: list[bytearray | None]) -> None:
        self._table: _Table = (32 - bits, buckets or [None] * (1 << bits))
        self._limit = min(self.grow_at << bits, 1 << 32)  # the record count that makes it grow

    def __len__(self) -> int:
        return self._n

    @property
    def buckets(self) -> int:
        return len(self._table[1])

    @staticmethod
    def _search(table: _Table, blob_id: bytes) -> tuple[bytearray, int] | None:
        shift, buckets = table
        b = buckets[int.from_bytes(blob_id[:4], "big") >> shift]
        if b is None:
            return None
        pos = b.find(blob_id)
        while pos >= 0:
            if pos % _RS == 0:
                return b, pos
            pos = b.find(blob_id, pos + 1)
        return None

    def _find(self, blob_id: bytes) -> tuple[bytearray, int] | None:
        if len(blob_id) != ID_LEN:
            return None
        gen = self._gen
        shift, buckets = self._table  # _search inlined: a lookup per blob in backup and prune
        b = buckets[int.from_bytes(blob_id[:4], "big") >> shift]
        if b is not None:
            pos = b.find(blob_id)
            while pos >= 0:
                if pos % _RS == 0:
                    return b, pos
                pos = b.find(blob_id, pos + 1)
        if gen & 1 or gen != self._gen:
            with self._lock:  # a growth ran meanwhile: wait for it, look in the new table
                return self._search(self._table, blob_id)
        return None

    def __contains__(self, blob_id: object) -> bool:
        return isinstance(blob_id, bytes) and self._find(blob_id) is not None

    def add_pack(self, pack_id: bytes, entries: Iterable[PackEntry]) -> None:
        with self._lock:
            no = self._pack_no.get(pack_id)
            if no is None:
                no = self._pack_no[pack_id] = len(self._packs)
                self._packs.append(pack_id)
                if self._ends is not None:
                    self._ends.append(0)
            # _find inlined: this loop runs once per blob when a repository opens (1M blobs:
            # a quarter of a no-change backup's time, profiled).
            (shift, buckets), limit, pack, n = self._table, self._limit, _REC.pack, self._n
            top = 0
            for e in entries:
                bid = e.id
                k = int.from_bytes(bid[:4], "big") >> shift
                b = buckets[k]
                if b is None:
                    b = buckets[k] = bytearray()
                else:
                    pos = b.find(bid)
                    while pos >= 0 and pos % _RS:
                        pos = b.find(bid, pos + 1)
                    if pos >= 0:
                        continue  # a duplicate copy in another pack: keep the first
                b += pack(bid, no, e.offset, e.length, e.raw_length, e.type, n)
                if e.offset + e.length > top:
                    top = e.offset + e.length
                n += 1
                if n > limit:
                    self._n = n
                    self._grow(bits_for(n, self.size_at))
                    (shift, buckets), limit = self._table, self._limit
            self._n = n
            if self._ends is not None and top > self._ends[no]:
                self._ends[no] = top

    def reserve(self, records: int) -> None:
        """Size the table for ``records`` in all, ahead of adding them (a load knows how many
        its index files hold), so that it does not grow step by step while they are added."""
        with self._lock:
            bits = bits_for(records, self.size_at)
            if bits > 32 - self._table[0]:
                self._grow(bits)

    def _grow(self, bits: int) -> None:
        """Move every record into a table of ``1 << bits`` buckets (caller holds ``_lock``).
        The new table's buckets that one old bucket's records go to are a run of neighbours:
        the old bucket's number followed by the id's next bits."""
        old_shift, old = self._table
        if 32 - bits >= old_shift:
            return
        shift = 32 - bits
        new: list[bytearray | None] = [None] * (1 << bits)
        self._gen += 1  # odd: a lookup's miss from now on may be false (see the class)
        i = 0
        try:
            for i, b in enumerate(old):
                if b is None:
                    continue
                for at in range(0, len(b), _RS):
                    k = int.from_bytes(b[at:at + 4], "big") >> shift
                    t = new[k]
                    if t is None:
                        new[k] = b[at:at + _RS]
                    else:
                        t += b[at:at + _RS]
                old[i] = None  # freed now, unless a lookup still holds it
            self._set_table(bits, new)
        except BaseException:  # interrupted (MemoryError, ^C): the moved records go back
            fan = old_shift - shift
            for j in range(i):
                parts = [c for c in new[j << fan:(j + 1) << fan] if c is not None]
                if parts:
                    old[j] = bytearray().join(parts)
            raise
        finally:
            self._gen += 1

    def _record(self, blob_id: bytes) -> tuple[bytes, int, int, int, int, int, int] | None:
        hit = self._find(blob_id)
        if hit is None:
            return None
        b, pos = hit
        rec: tuple[bytes, int, int, int, int, int, int] = _REC.unpack_from(b, pos)
        return rec

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        r = self._record(blob_id)
        if r is None:
            return None
        return BlobLocation(self._packs[r[1]], r[2], r[3], BlobType(r[5]))

    def raw_length(self, blob_id: bytes) -> int:
        """The blob's plaintext length; 0 if it is not indexed."""
        return self.plain_size(blob_id) or 0

    def plain_size(self, blob_id: bytes) -> int | None:
        """The blob's plaintext length, None if it is not indexed (one lookup)."""
        r = self._record(blob_id)
        return None if r is None else r[4]

    def position(self, blob_id: bytes) -> int | None:
        """Dense number of the blob (0..len-1), for bitmaps of marks."""
        r = self._record(blob_id)
        return None if r is None else r[6]

    def packs(self) -> list[bytes]:
        return list(self._packs)

    def pack_ends(self) -> dict[bytes, int]:
        """Each pack's size as far as its blobs in the index go (the end of the furthest one)."""
        with self._lock:
            if self._ends is None:  # one pass over the records (not kept in an old copy)
                ends = [0] * len(self._packs)
                for b in self._table[1]:
                    for no, off, ln in _ENDS.iter_unpack(b or b""):
                        ends[no] = max(ends[no], off + ln)
                self._ends = ends
            return dict(zip(self._packs, self._ends, strict=True))

    def drop(self, limits: dict[bytes, int]) -> int:
        """Forget every blob of a pack in ``limits`` whose bytes do not all lie below its
        limit (0: the pack is gone; a size: it was cut short), so the blob counts as absent
        and is stored again. Returns how many were dropped. Positions and the count stay as
        they were (positions of the rest do not move); a bucket is replaced whole, so a
        lookup meanwhile sees it before or after."""
        nos = {self._pack_no[p]: lim for p, lim in limits.items() if p in self._pack_no}
        if not nos:
            return 0
        dropped = 0
        # A few packs: their numbers are searched for in each bucket (bytes.find, in C), and
        # only the buckets holding one are rebuilt (1M blobs, one pack of 3,334: 1.3 s -> 0.33 s).
        needles = [no.to_bytes(4, "little") for no in nos] if len(nos) <= 8 else []
        with self._lock:
            buckets = self._table[1]
            for k, b in enumerate(buckets):
                if b is None or (needles and not any(_holds(b, n) for n in needles)):
                    continue
                keep = [b[at:at + _RS] for at, (no, off, ln) in zip(range(0, len(b), _RS), _ENDS.iter_unpack(b),
                                                                     strict=True)
                        if no not in nos or off + ln <= nos[no]]
                if len(keep) * _RS != len(b):
                    dropped += len(b) // _RS - len(keep)
                    buckets[k] = bytearray().join(keep) if keep else None
            if self._ends is not None:
                for no, lim in nos.items():
                    self._ends[no] = min(self._ends[no], lim)
        return dropped

    def export_state(self) -> tuple[list[bytes], list[bytearray | None], int, list[int]]:
        """(pack ids, buckets, blob count, pack ends) as they are, not copied, for the local
        copy of the built index (indexcache.py); the bucket count is the list's length. The
        buckets are this index's own: the caller writes them out while nothing adds to the
        index."""
        ends = list(self.pack_ends().values())
        with self._lock:
            return list(self._packs), list(self._table[1]), self._n, ends

    @classmethod
    def from_state(cls, packs: list[bytes], buckets: list[bytearray | None], n: int,
                   ends: list[int] | None = None) -> Index:
        """The index ``export_state`` gave, read back (indexcache.py has authenticated it)."""
        if not valid_bucket_count(len(buckets)):
            raise ValueError(f"an index cannot have {len(buckets)} buckets")
        if ends is not None and len(ends) != len(packs):
            raise ValueError("one end for each pack")
        idx = cls()
        idx._packs = packs
        idx._pack_no = {p: no for no, p in enumerate(packs)}
        idx._ends = ends
        idx._set_table(len(buckets).bit_length() - 1, buckets)
        idx._n = n
        return idx

    def has_pack(self, pack_id: bytes) -> bool:
        return pack_id in self._pack_no

    def iter_records(self) -> Iterator[tuple[bytes, bytes, PackEntry, int]]:
        """(blob id, pack id, entry, position) for every blob, in no particular order,
        without building a list of them all."""
        packs = self._packs
        with self._lock:  # a copy of the list: a growth meanwhile empties the one it had
            buckets = list(self._table[1])
        for b in buckets:
            if b is None:
                continue
            for bid, no, off, ln, raw, typ, seq in _REC.iter_unpack(bytes(b)):
                yield bid, packs[no], PackEntry(typ, bid, off, ln, raw), seq

    def blob_ids(self) -> Iterator[bytes]:
        return (r[0] for r in self.iter_records())

    def entries_by_pack(self) -> dict[bytes, list[PackEntry]]:
        out: dict[bytes, list[PackEntry]] = {}
        for _bid, pack, entry, _pos in self.iter_records():
            out.setdefault(pack, []).append(entry)
        for entries in out.values():
            entries.sort(key=lambda e: e.offset)
        return out
