"""Content-defined chunking with FastCDC (pyfastcdc, nogil Cython)."""

from __future__ import annotations

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

    The chunker carries no state between calls. Streaming callers cut a read window and
    cut its last chunk again with the next window, so boundaries do not depend on read sizes
    (see backup/files/content.py).
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
