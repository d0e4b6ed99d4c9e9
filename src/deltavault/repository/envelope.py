"""Sealing: optional zstd compression, then AES-256-GCM, around every stored byte.

Sealed layout, encrypted:   nonce(12) | AES-GCM(flags(1) | body) incl. 16-byte tag
Sealed layout, unencrypted: flags(1) | body
flags bit 0: body is zstd-compressed.
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


class Envelope:
    """Thread-safe: compressors are kept per thread."""

    def __init__(self, key: MasterKey | None, level: int = 3) -> None:
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

    def seal(self, data: bytes | memoryview, *, compress: bool = True, level: int | None = None,
             aad: bytes | None = None) -> bytes:
        flags = 0
        body: bytes | memoryview = data
        if compress and len(data) >= 64:
            packed = self._compressor(self.level if level is None else level).compress(data)
            if len(packed) <= len(data) * (1 - MIN_SAVING):
                body, flags = packed, FLAG_ZSTD
        payload = bytes((flags,)) + body
        if self._aead is None:
            return payload
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, payload, aad)

    def open(self, sealed: bytes | memoryview, *, aad: bytes | None = None, what: str = "object") -> bytes:
        if self._aead is not None:
            if len(sealed) < _NONCE + _TAG + 1:
                raise FormatError(f"{what}: too short to be sealed data ({len(sealed)} bytes)")
            try:
                payload = self._aead.decrypt(bytes(sealed[:_NONCE]), bytes(sealed[_NONCE:]), aad)
            except InvalidTag:
                raise CorruptionError(f"{what}: authentication failed (damaged or tampered)") from None
        else:
            payload = bytes(sealed)
            if not payload:
                raise FormatError(f"{what}: empty")
        flags = payload[0]
        if flags & ~FLAG_ZSTD:
            raise FormatError(f"{what}: unknown flags {flags:#x}")
        if flags & FLAG_ZSTD:
            try:
                return self._decompressor().decompress(payload[1:], max_output_size=MAX_BLOB)
            except zstandard.ZstdError as exc:
                raise CorruptionError(f"{what}: bad compressed data: {exc}") from exc
        return payload[1:]
