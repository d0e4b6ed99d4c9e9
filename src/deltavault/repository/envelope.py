"""Sealing: optional zstd compression, then AES-256-GCM, around every stored byte.

Sealed layout, encrypted:   flags(1) | nonce(12) | AES-GCM(body, aad = kind | flags) incl. 16-byte tag
Sealed layout, unencrypted: flags(1) | body
flags bit 0: body is zstd-compressed. The flags byte is authenticated through the AAD,
which keeps it out of the ciphertext, so sealing never copies the body.
"""

from __future__ import annotations

import os
import threading

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
# Above this a zstd frame is refused on decompression: no blob is that big.
MAX_BLOB = 256 * 1024 * 1024


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

    def _auto_level(self, data: bytes | memoryview) -> int:
        if len(data) <= 2 * AUTO_PROBE:
            return AUTO_HIGH
        probe = data[:AUTO_PROBE]
        fast = len(self._compressor(AUTO_FAST).compress(probe))
        high = len(self._compressor(AUTO_HIGH).compress(probe))
        return AUTO_HIGH if fast - high > AUTO_MIN_GAIN * fast else AUTO_FAST

    def seal_parts(self, data: bytes | memoryview, *, compress: bool = True, level: int | None = None,
                   aad: bytes = b"") -> tuple[bytes, bytes | memoryview]:
        """Sealed form as (header, body) so callers can write both without joining them."""
        flags = 0
        body: bytes | memoryview = data
        if compress and len(data) >= 64:
            lvl = self.level if level is None else level
            if lvl is None:
                lvl = self._auto_level(data)
            packed = self._compressor(lvl).compress(data)
            if len(packed) <= len(data) * (1 - MIN_SAVING):
                body, flags = packed, FLAG_ZSTD
        head = bytes((flags,))
        if self._aead is None:
            return head, body
        nonce = os.urandom(_NONCE)
        return head + nonce, self._aead.encrypt(nonce, body, aad + head)

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
            try:
                body: bytes | memoryview = self._aead.decrypt(
                    mv[1:1 + _NONCE], mv[1 + _NONCE:], aad + bytes((flags,)))
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
