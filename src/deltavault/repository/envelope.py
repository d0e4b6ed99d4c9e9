"""Sealing: optional zstd compression, then AES-256-GCM, around every stored byte.

Sealed layout, encrypted:   flags(1) | nonce(12) | AES-GCM(body, aad = kind | flags) incl. 16-byte tag
Sealed layout, unencrypted: flags(1) | body
flags bit 0: body is zstd-compressed. The flags byte is authenticated through the AAD,
which keeps it out of the ciphertext, so sealing never copies the body.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from deltavault.errors import CorruptionError, FormatError
from deltavault.repository.keys import MasterKey

FLAG_ZSTD = 0x01
_NONCE = 12
_TAG = 16
# Store raw when compression saves less than this fraction.
MIN_SAVING = 0.02
# Above this a zstd frame is refused on decompression (a damaged or forged frame header
# could declare any size, allocated up front). So nothing larger is ever compressed
# (``_compressible``): a directory of a million long names has a tree blob over it, and
# stored compressed it was a snapshot that backed up and could never be read.
MAX_BLOB = 256 * 1024 * 1024
# Compressed bodies up to this size are decrypted into a per-thread buffer (Envelope.open).
SCRATCH_MAX = 8 * 1024 * 1024


# The "auto" policy: compress an 8 KiB probe at a fast and at a high level. Data that gains
# from the high level (code, text) gets it; data that gains little (databases with random
# payloads, media, compressed files) gets the fast level, which is 2-3x quicker for the same
# ratio there. Measured on the benchmark data; see docs/benchmarks.md.
AUTO_PROBE = 8192
AUTO_MIN_GAIN = 0.10
AUTO_HIGH = 3
AUTO_FAST = -3


class Envelope:
    """Thread-safe: compressors are kept per thread. ``level=None`` is the auto policy."""

    def __init__(self, key: MasterKey | None, level: int | None = None) -> None:
        self.key = key
        self.level = level
        self._aead = AESGCM(key.enc) if key else None
        self._tls = threading.local()

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    @property
    def overhead(self) -> int:
        return 1 + (_NONCE + _TAG if self._aead else 0)

    def blob_id(self, data: bytes | memoryview) -> bytes:
        if self.key:
            return blake3.blake3(data, key=self.key.mac).digest()
        return blake3.blake3(data).digest()

    def _compressor(self, level: int) -> zstandard.ZstdCompressor:
        cache = getattr(self._tls, "c", None)
        if cache is None:
            cache = self._tls.c = {}
        c = cache.get(level)
        if c is None:
            c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._tls, "d", None)
        if d is None:
            d = self._tls.d = zstandard.ZstdDecompressor()
        return d

    def _scratch(self, n: int) -> memoryview:
        """``n`` bytes of this thread's scratch buffer. A larger one replaces it (never resized:
        a view of the old one may still be alive, in a traceback)."""
        buf: bytearray | None = getattr(self._tls, "scratch", None)
        if buf is None or len(buf) < n:
            buf = self._tls.scratch = bytearray(max(n, 1 << 20))
        return memoryview(buf)[:n]

    def _auto_level(self, data: bytes | memoryview) -> int:
        if len(data) <= 2 * AUTO_PROBE:
            return AUTO_HIGH
        probe = data[:AUTO_PROBE]
        return _auto_choice(len(self._compressor(AUTO_FAST).compress(probe)),
                            len(self._compressor(AUTO_HIGH).compress(probe)))

    def seal_parts(self, data: bytes | memoryview, *, compress: bool = True, level: int | None = None,
                   aad: bytes = b"") -> tuple[bytes, bytes | memoryview]:
        """Sealed form as (header, body) so callers can write both without joining them."""
        flags = 0
        body: bytes | memoryview = data
        if compress and _compressible(len(data)):
            lvl = self.level if level is None else level
            if lvl is None:
                lvl = self._auto_level(data)
            packed = self._compressor(lvl).compress(data)
            if _worth_it(len(packed), len(data)):
                body, flags = packed, FLAG_ZSTD
        return self._encrypt(flags, body, aad)

    def _encrypt(self, flags: int, body: bytes | memoryview, aad: bytes,
                 nonce: bytes | None = None) -> tuple[bytes, bytes | memoryview]:
        """(header, body) of a sealed blob: the flags byte and the nonce (a fresh one unless
        given), then the AEAD of the body, the flags byte authenticated with it; unencrypted,
        the flags and the body."""
        head = bytes((flags,))
        if self._aead is None:
            return head, body
        if nonce is None:
            nonce = os.urandom(_NONCE)
        return head + nonce, self._aead.encrypt(nonce, body, aad + head)

    def seal_many(self, items: Sequence[bytes | memoryview], *, compress: bool = True,
                  level: int | None = None, aad: bytes = b"") -> list[tuple[bytes, bytes | memoryview]]:
        """``[seal_parts(x) for x in items]``, to the same bytes (nonces aside): each item at
        the level ``seal_parts`` would choose for it, but compressed in a few zstd batch
        calls (``multi_compress_to_buffer``, which hold no GIL) rather than one to three
        calls an item, each giving the GIL up and waiting to win it back. Small files come
        to the workers as batches of many small chunks (docs/benchmarks.md, *File backup*)."""
        if len(items) < 2:
            return [self.seal_parts(x, compress=compress, level=level, aad=aad) for x in items]
        bodies: list[bytes | memoryview] = list(items)
        flags = [0] * len(items)
        if compress:
            for lvl, idx in self._levels(items, level).items():
                packed = self._compressor(lvl).multi_compress_to_buffer([items[i] for i in idx])
                for k, i in enumerate(idx):
                    seg = packed[k]
                    if _worth_it(len(seg), len(items[i])):
                        # a view of the batch's output buffer (BufferSegment: the buffer protocol)
                        bodies[i], flags[i] = memoryview(seg), FLAG_ZSTD  # type: ignore[arg-type]
        if self._aead is None:
            return [self._encrypt(f, body, aad) for f, body in zip(flags, bodies)]
        nonces = os.urandom(_NONCE * len(items))  # one call for the batch's nonces
        return [self._encrypt(f, body, aad, nonces[k * _NONCE:(k + 1) * _NONCE])
                for k, (f, body) in enumerate(zip(flags, bodies))]

    def _levels(self, items: Sequence[bytes | memoryview], level: int | None) -> dict[int, list[int]]:
        """Which items ``seal_parts`` would compress, by the level it would use: the auto
        policy's probes (``_auto_level``) taken in two batch calls."""
        todo = [i for i, x in enumerate(items) if _compressible(len(x))]
        lvl = self.level if level is None else level
        if lvl is not None:
            return {lvl: todo} if todo else {}
        out: dict[int, list[int]] = {AUTO_HIGH: [], AUTO_FAST: []}
        probed = []
        for i in todo:
            if len(items[i]) <= 2 * AUTO_PROBE:
                out[AUTO_HIGH].append(i)
            else:
                probed.append(i)
        if probed:
            probes: list[bytes | bytearray | memoryview] = [memoryview(items[i])[:AUTO_PROBE] for i in probed]
            fast = self._compressor(AUTO_FAST).multi_compress_to_buffer(probes)
            high = self._compressor(AUTO_HIGH).multi_compress_to_buffer(probes)
            for k, i in enumerate(probed):
                out[_auto_choice(len(fast[k]), len(high[k]))].append(i)
        return {lv: idx for lv, idx in out.items() if idx}

    def seal(self, data: bytes | memoryview, *, compress: bool = True, level: int | None = None,
             aad: bytes = b"") -> bytes:
        head, body = self.seal_parts(data, compress=compress, level=level, aad=aad)
        return head + body

    def open(self, sealed: bytes | memoryview, *, aad: bytes = b"", what: str = "object") -> bytes:
        mv = memoryview(sealed)
        if not len(mv):
            raise FormatError(f"{what}: empty")
        flags = mv[0]
        if flags & ~FLAG_ZSTD:
            raise FormatError(f"{what}: unknown flags {flags:#x}")
        if self._aead is not None:
            if len(mv) < 1 + _NONCE + _TAG:
                raise FormatError(f"{what}: too short to be sealed data ({len(mv)} bytes)")
            nonce, ct, ad = mv[1:1 + _NONCE], mv[1 + _NONCE:], aad + bytes((flags,))
            try:
                if flags & FLAG_ZSTD and len(ct) - _TAG <= SCRATCH_MAX:
                    # Only zstd reads it: decrypted into this thread's scratch buffer, warm in
                    # the cache, instead of a new bytes object (on the benchmark database 0.14
                    # -> 0.08 CPU-s of AES-GCM, with the GIL held).
                    body: bytes | memoryview = self._scratch(len(ct) - _TAG)
                    self._aead.decrypt_into(nonce, ct, ad, body)
                else:
                    body = self._aead.decrypt(nonce, ct, ad)
            except InvalidTag:
                raise CorruptionError(f"{what}: authentication failed (damaged or tampered)") from None
        else:
            body = mv[1:]
        if flags & FLAG_ZSTD:
            try:
                # zstandard allocates a frame's declared size up front and applies
                # max_output_size only when none is declared, so check it first.
                declared = zstandard.frame_content_size(body)
                if declared > MAX_BLOB:
                    raise CorruptionError(f"{what}: compressed data declares {declared} bytes, "
                                          f"over the {MAX_BLOB}-byte limit")
                return self._decompressor().decompress(body, max_output_size=MAX_BLOB)
            except zstandard.ZstdError as exc:
                raise CorruptionError(f"{what}: bad compressed data: {exc}") from exc
        return bytes(body)


def _compressible(n: int) -> bool:
    """Whether ``n`` bytes are worth trying to compress and small enough that ``open`` will
    decompress them."""
    return 64 <= n <= MAX_BLOB


def _auto_choice(fast: int, high: int) -> int:
    """The ``auto`` level from the sizes of the probe at AUTO_FAST and AUTO_HIGH: the high
    level only when it saves at least AUTO_MIN_GAIN."""
    return AUTO_HIGH if fast - high > AUTO_MIN_GAIN * fast else AUTO_FAST


def _worth_it(packed: int, raw: int) -> bool:
    """Whether a compressed body of ``packed`` bytes is stored instead of the ``raw`` ones."""
    return packed <= raw * (1 - MIN_SAVING)
