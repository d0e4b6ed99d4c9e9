"""A local copy of the built in-memory index, so opening a repository whose index files
have not changed reads a few large runs of bytes instead of decoding every index file
(1M blobs: 1.5 to 2 s of a no-change backup; docs/benchmarks.md).

The file (``<cache>/<repo id>/index.built``, format in docs/design.md) holds the index's
record buckets as they are in memory and the state the index store kept with them: the
index files listed when it was built, those loaded and those superseded. A keyed BLAKE3
under a key derived from the master key (``Repository.cache_key("index")``) covers all
of it: the format version, the record layout, the repository id and those names. The
file is used only when that MAC verifies, checked before anything is built from it; any trouble (absent, truncated, damaged,
another repository's, another version's) makes ``read`` return None and the index is
loaded from the index files as before. The index store then decides, from the names,
whether the copy is current (indexstore.py).

An unencrypted repository has no secret: its copy is hashed under a public key, which
catches damage, and is otherwise protected only by being private to the user (fs.files),
as its catalog is.
"""

from __future__ import annotations

import hmac
import io
import os
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

import blake3
import msgspec

from deltavault.errors import Undecodable
from deltavault.framing import decode_msgpack
from deltavault.fs.files import open_cache_path, write_cache_parts
from deltavault.model.types import ID_LEN
from deltavault.repository.index import RECORD_FORMAT, RECORD_SIZE, Index, valid_bucket_count

FILE_NAME = "index.built"
# 2: the bucket count in the head (1 had 65,536 buckets always); 3: each pack's end, so a
# backup sees a truncated pack without a pass over the records (indexstore.check_packs)
FORMAT_VERSION = 3
MAGIC = b"DVINDEXC"
_PREFIX = len(MAGIC) + 8  # magic | version u32 LE | head length u32 LE
_MAC = 32
_MAX_HEAD = 64 << 20  # names of index files: far below this
_GROUP = 1 << 20  # buckets are read and hashed in runs of about this many bytes
_PUBLIC_KEY = blake3.blake3(b"", derive_key_context="deltavault local index copy, unencrypted repository v1").digest()


class _Head(msgspec.Struct, array_like=True):
    repo: str
    record: str  # the record layout (struct format), so a changed layout never parses
    listed: list[str]
    loaded: list[str]
    superseded: list[str]
    packs: int
    blobs: int
    buckets: int  # a power of two (index.py): the table's size as it was built


@dataclass
class Built:
    index: Index
    listed: list[str]  # sorted: the names listed under index/ when it was built
    loaded: set[str]
    superseded: set[str]


class IndexCopy:
    """The built-index file of one repository's cache directory."""

    def __init__(self, directory: Path, repo_id: str, key: bytes | None) -> None:
        self.path = directory / FILE_NAME
        self.repo_id = repo_id
        self.key = key or _PUBLIC_KEY

    def write(self, index: Index, listed: list[str], loaded: set[str], superseded: set[str]) -> bool:
        """Write the copy atomically (best effort, as every cache write). Call it while nothing
        adds to ``index``: its buckets are written as they are, not copied."""
        packs, buckets, n, ends = index.export_state()
        head = msgspec.msgpack.encode(_Head(self.repo_id, RECORD_FORMAT, sorted(listed), sorted(loaded),
                                            sorted(superseded), len(packs), n, len(buckets)))
        lengths = array("I", (len(b) if b is not None else 0 for b in buckets))
        if sys.byteorder == "big":
            lengths.byteswap()
        prefix = MAGIC + FORMAT_VERSION.to_bytes(4, "little") + len(head).to_bytes(4, "little")
        parts: list[bytes | bytearray | memoryview] = [prefix, head, b"".join(packs), lengths.tobytes()]
        parts += [b for b in buckets if b]
        ends_arr = array("Q", ends)
        if sys.byteorder == "big":
            ends_arr.byteswap()
        parts.append(ends_arr.tobytes())
        mac = blake3.blake3(key=self.key)
        for p in parts:
            mac.update(p)
        parts.append(mac.digest())
        return write_cache_parts(self.path, parts)

    def read(self) -> Built | None:
        """The index the copy holds, or None when there is none to trust."""
        fd = open_cache_path(self.path)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            with os.fdopen(fd, "rb") as f:
                # Authenticated before anything is built from it, so a planted file whose
                # lengths add up (a huge sparse one) allocates nothing; the parse below
                # hashes what it reads again, in case the file changed in between.
                if not self._authentic(f, size):
                    return None
                f.seek(0)
                return self._parse(f, size)
        except (OSError, ValueError, Undecodable):
            return None

    def _authentic(self, f: io.BufferedReader, size: int) -> bool:
        if size < _PREFIX + _MAC:
            return False
        mac = blake3.blake3(key=self.key)
        buf = bytearray(_GROUP)
        left = size - _MAC
        while left:
            n = f.readinto(memoryview(buf)[:min(left, _GROUP)])
            if not n:
                return False
            mac.update(memoryview(buf)[:n])
            left -= n
        return hmac.compare_digest(f.read(_MAC), mac.digest())

    def _parse(self, f: io.BufferedReader, size: int) -> Built | None:
        mac = blake3.blake3(key=self.key)

        def take(n: int) -> bytes:
            data = f.read(n)
            if len(data) != n:
                raise ValueError("truncated")
            mac.update(data)
            return data

        prefix = take(_PREFIX)
        if prefix[:len(MAGIC)] != MAGIC or int.from_bytes(prefix[8:12], "little") != FORMAT_VERSION:
            return None
        head_len = int.from_bytes(prefix[12:16], "little")
        if head_len > min(size, _MAX_HEAD):
            return None
        head = decode_msgpack(take(head_len), _Head)
        if head.repo != self.repo_id or head.record != RECORD_FORMAT:
            return None
        # Every length is checked against the file's size before anything that size is
        # allocated: a damaged length cannot make this allocate more than the file holds.
        if not valid_bucket_count(head.buckets):
            return None
        fixed = _PREFIX + head_len + head.packs * (ID_LEN + 8) + 4 * head.buckets + _MAC
        if head.packs < 0 or head.blobs < 0 or fixed > size:
            return None
        raw_packs = take(head.packs * ID_LEN)
        lengths = array("I")
        lengths.frombytes(take(4 * head.buckets))
        if sys.byteorder == "big":
            lengths.byteswap()
        if fixed + sum(lengths) != size or sum(lengths) != head.blobs * RECORD_SIZE \
                or any(n % RECORD_SIZE for n in lengths):
            return None
        buckets = self._read_buckets(f, lengths, mac)
        ends = array("Q")
        ends.frombytes(take(8 * head.packs))
        if sys.byteorder == "big":
            ends.byteswap()
        if not hmac.compare_digest(f.read(_MAC), mac.digest()):
            return None
        packs = [raw_packs[i:i + ID_LEN] for i in range(0, len(raw_packs), ID_LEN)]
        return Built(Index.from_state(packs, buckets, head.blobs, ends.tolist()), head.listed, set(head.loaded),
                     set(head.superseded))

    @staticmethod
    def _read_buckets(f: io.BufferedReader, lengths: array[int], mac: blake3.blake3) -> list[bytearray | None]:
        """The buckets, read and hashed a run of neighbours at a time (one read and one hash
        update a megabyte, not one a bucket); each bucket is then its own bytearray, so the
        peak is the index and one run."""
        count = len(lengths)
        buckets: list[bytearray | None] = [None] * count
        first = 0
        while first < count:
            last, run = first, 0
            while last < count and (run == 0 or run + lengths[last] <= _GROUP):
                run += lengths[last]
                last += 1
            buf = bytearray(run)
            view = memoryview(buf)
            got = 0
            while got < run:
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError("truncated")
                got += n
            mac.update(buf)
            at = 0
            for k in range(first, last):
                n = lengths[k]
                if n:
                    buckets[k] = bytearray(view[at:at + n])
                    at += n
            view.release()
            first = last
        return buckets
