"""Content-defined chunking with FastCDC (pyfastcdc, nogil Cython)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyfastcdc


@dataclass(frozen=True)
class CdcParams:
    min_size: int
    avg_size: int
    max_size: int
    seed: int = 0


class Chunker:
    """Cuts byte streams into content-defined chunks.

    The chunker carries no state between calls. ``cut_stream`` keeps the unfinished tail
    of each read buffer so chunk boundaries do not depend on read sizes.
    """

    def __init__(self, params: CdcParams) -> None:
        self.params = params
        # avg_size is the gear mask's target (a power of two); the mean chunk is about
        # min_size + avg_size because of cut-point skipping. pyfastcdc shifts the seed
        # left once, so it must fit in 63 bits.
        self._cdc = pyfastcdc.FastCDC(params.avg_size, min_size=params.min_size,
                                      max_size=params.max_size, normalized_chunking=1,
                                      seed=params.seed & ((1 << 63) - 1))

    def cut(self, buf: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
        """(offset, length) of each chunk of a complete buffer."""
        if len(buf) <= self.params.min_size:
            return [(0, len(buf))] if len(buf) else []
        return [(c.offset, c.length) for c in self._cdc.cut_buf(buf)]

    def cut_stream(self, read: Iterator[bytes], *, final_tail: bool = True) -> Iterator[bytes]:
        """Chunks of the concatenation of the buffers ``read`` yields."""
        carry = b""
        for piece in read:
            buf = carry + piece if carry else piece
            if len(buf) < self.params.max_size:
                carry = buf
                continue
            cuts = self.cut(buf)
            # The last chunk may end only because the buffer ended: carry it over.
            last_off, _last_len = cuts[-1]
            mv = memoryview(buf)
            for off, ln in cuts[:-1]:
                yield bytes(mv[off:off + ln])
            carry = bytes(mv[last_off:])
        if carry:
            mv = memoryview(carry)
            for off, ln in self.cut(carry):
                yield bytes(mv[off:off + ln])
