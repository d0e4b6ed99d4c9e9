"""Pack files: immutable containers of sealed blobs.

Layout: MAGIC(8) | sealed blob ... | sealed header | header_len(u32 LE) | TRAILER(4)
The header is a sealed msgpack list of [type, id, offset, length, raw_length]. A pack's
name is the BLAKE3 of all its bytes, so `check` verifies a pack without the key.

A pack being filled by a backup is spooled to an unlinked temporary file (``spool=True``),
not held in memory: with a 32 MiB pack filling, two queued and one uploading, packs were
most of a backup's memory (docs/benchmarks.md, *Memory*). A backend that can store from a
file (``put_file``: the local one copies it in the kernel, sftp and S3 send it a piece at a
time) gets the spool; any other gets the pack read back whole, since ``Backend.put`` takes
bytes.
"""

from __future__ import annotations

import os
import struct
import tempfile

import blake3
import msgspec

from deltavault.errors import NO_SPACE_ERRNOS, BackendError, FormatError, NoSpace, Undecodable
from deltavault.framing import decode_msgpack
from deltavault.model.types import ID_LEN, BlobType
from deltavault.repository.envelope import Envelope

MAGIC = b"DVPACK\x01\x00"
TRAILER = b"DVP1"
_TAIL = struct.Struct("<I4s")
HEADER_AAD = b"pack-header"
BLOB_AAD = b"blob"
MAX_HEADER = 64 * 1024 * 1024
READ_PIECE = 1024 * 1024  # a spooled pack is read back this much at a time
_IOV_MAX = 1024  # buffers one pwritev takes (Linux, POSIX minimum 16 aside)


class PackEntry(msgspec.Struct, array_like=True, frozen=True):
    type: int
    id: bytes
    offset: int
    length: int
    raw_length: int


def pack_name(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"data/{h[:2]}/{h}"


def _write_all(fd: int, bufs: list[bytes | memoryview], offset: int) -> None:
    """Write ``bufs`` at ``offset``: a failed write leaves nothing that a retry at the same
    offset would not overwrite."""
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    while views:
        n = os.pwritev(fd, views[:_IOV_MAX], offset)
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


class PackBuilder:
    """Accumulates sealed blobs, as parts in memory or (``spool``) written to an unlinked
    temporary file in ``spool_dir`` (None: the system's, ``TMPDIR``); ``finish`` returns
    (pack id, bytes, entries), joining the parts once or reading the spool back once."""

    def __init__(self, *, spool: bool = False, spool_dir: str | None = None) -> None:
        self.parts: list[bytes | memoryview] = []
        self._spool_dir = spool_dir or tempfile.gettempdir()
        try:
            self._spool = tempfile.TemporaryFile(dir=spool_dir) if spool else None  # noqa: SIM115 (closed by discard)
        except OSError as exc:
            raise self._spool_error(exc) from exc
        self.size = 0
        self.entries: list[PackEntry] = []
        self._append([MAGIC])
        self.size = len(MAGIC)

    def _spool_error(self, exc: OSError) -> BaseException:
        if exc.errno in NO_SPACE_ERRNOS:
            return NoSpace(f"no space left in {self._spool_dir} (TMPDIR) for a pack being filled")
        return BackendError(f"pack spool in {self._spool_dir} (TMPDIR): {exc.strerror or exc}", retryable=False)

    @property
    def spooled(self) -> bool:
        return self._spool is not None

    def _append(self, bufs: list[bytes | memoryview]) -> None:
        if self._spool is not None:
            try:
                _write_all(self._spool.fileno(), bufs, self.size)
            except OSError as exc:
                raise self._spool_error(exc) from exc
        else:
            self.parts.extend(bufs)

    def __len__(self) -> int:
        return self.size

    def add(self, btype: BlobType, blob_id: bytes, sealed: tuple[bytes, bytes | memoryview],
            raw_length: int) -> int:
        return self.add_many([(btype, blob_id, sealed, raw_length)])[0]

    def add_many(self, items: list[tuple[BlobType, bytes, tuple[bytes, bytes | memoryview], int]]) -> list[int]:
        """``add`` each of (type, id, sealed, raw length) in one write; their lengths."""
        bufs: list[bytes | memoryview] = []
        lengths = []
        pos = self.size
        entries = []
        for btype, blob_id, (head, body), raw_length in items:
            length = len(head) + len(body)
            bufs += (head, body)
            entries.append(PackEntry(int(btype), blob_id, pos, length, raw_length))
            lengths.append(length)
            pos += length
        self._append(bufs)
        self.entries += entries
        self.size = pos
        return lengths

    def finish(self, env: Envelope) -> tuple[bytes, bytes, list[PackEntry]]:
        header = env.seal(msgspec.msgpack.encode(self.entries), aad=HEADER_AAD)
        tail = _TAIL.pack(len(header), TRAILER)
        self._append([header, tail])
        self.size += len(header) + len(tail)
        if self._spool is not None:
            try:
                data = _read_back(self._spool.fileno(), self.size)
            finally:
                self.discard()
        else:
            data = b"".join(self.parts)
            self.parts = []
        return blake3.blake3(data).digest(), data, self.entries

    def finish_spooled(self, env: Envelope) -> tuple[bytes, int, list[PackEntry]]:
        """Like ``finish`` for a spooled pack, but the bytes stay in the spool: returns (pack
        id, the spool's descriptor, entries); the caller calls ``discard`` when done with it.
        The pack id is hashed reading the spool back a piece at a time."""
        assert self._spool is not None
        header = env.seal(msgspec.msgpack.encode(self.entries), aad=HEADER_AAD)
        tail = _TAIL.pack(len(header), TRAILER)
        self._append([header, tail])
        self.size += len(header) + len(tail)
        fd = self._spool.fileno()
        h = blake3.blake3()
        pos = 0
        while pos < self.size:
            piece = os.pread(fd, min(READ_PIECE, self.size - pos), pos)
            if not piece:
                raise OSError(f"pack spool: read {pos} of {self.size} bytes")
            h.update(piece)
            pos += len(piece)
        return h.digest(), fd, self.entries

    def discard(self) -> None:
        """Drop what was spooled (a pack that will not be written)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self.parts = []


def _read_back(fd: int, size: int) -> bytes:
    data = os.pread(fd, size, 0)
    if len(data) == size:
        return data
    buf = bytearray(data)
    while len(buf) < size:
        piece = os.pread(fd, size - len(buf), len(buf))
        if not piece:
            raise OSError(f"pack spool: read {len(buf)} of {size} bytes")
        buf += piece
    return bytes(buf)


def tail_size() -> int:
    return _TAIL.size


def parse_tail(tail: bytes, pack_size: int, name: str) -> int:
    """Header length from the last bytes of a pack."""
    if len(tail) < _TAIL.size:
        raise FormatError(f"pack {name}: truncated ({pack_size} bytes)")
    hlen, trailer = _TAIL.unpack(tail[-_TAIL.size:])
    if trailer != TRAILER:
        raise FormatError(f"pack {name}: bad trailer (truncated or not a pack)")
    if hlen <= 0 or hlen > MAX_HEADER or hlen + _TAIL.size + len(MAGIC) > pack_size:
        raise FormatError(f"pack {name}: impossible header length {hlen}")
    return int(hlen)


def parse_header(env: Envelope, sealed_header: bytes, pack_size: int, name: str) -> list[PackEntry]:
    raw = env.open(sealed_header, aad=HEADER_AAD, what=f"pack {name} header")
    try:
        entries = decode_msgpack(raw, list[PackEntry])
    except Undecodable as exc:
        raise FormatError(f"pack {name}: header does not parse: {exc}") from exc
    limit = pack_size - len(sealed_header) - _TAIL.size
    for e in entries:
        if (len(e.id) != ID_LEN or e.offset < len(MAGIC) or e.length <= 0
                or e.offset + e.length > limit or e.type not in BlobType._value2member_map_
                or not 0 <= e.raw_length < 1 << 32):
            raise FormatError(f"pack {name}: header entry out of bounds or invalid")
    return entries


def read_pack_entries(env: Envelope, data: bytes, name: str) -> list[PackEntry]:
    """Parse a whole pack held in memory (used by check and repair)."""
    if not data.startswith(MAGIC):
        raise FormatError(f"pack {name}: bad magic")
    hlen = parse_tail(data[-_TAIL.size:], len(data), name)
    start = len(data) - _TAIL.size - hlen
    return parse_header(env, data[start:start + hlen], len(data), name)
