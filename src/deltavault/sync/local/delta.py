"""Delta update of a big file that changed in place (a database, a VM image).

Both versions are on local disks, so each 4 KiB page of the new version is compared with
the page at the same offset of the old one, byte for byte: the same answer digests would
give, for less CPU. Only the differing pages (and any growth) are written, into a target
that already holds the old content: a reflink clone of the old file (atomic: renamed over
it afterwards) or, with --inplace, the old file itself.

Why pages and not FastCDC chunks: in the benchmark database 1% of 4 KiB pages change at
random places. A chunk of mean size S that contains a changed page must be rewritten
whole, so chunks write about S / 4 KiB times the changed bytes (FastCDC's 64 KiB minimum
alone would be 16x); the target is at most 1.2x. Chunks match content that moved, which
matters when shipping data over a network, not when rewriting a clone locally: writing a
moved chunk costs as much as writing it new, and a clone shares only block-aligned data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import blake3

from deltavault.fs.clone import pread_full, pwrite_all
from deltavault.sync.data import BufferPool, Cancelled, SourceChanged, read_source

PAGE = 4096


@dataclass
class DeltaResult:
    written: int  # bytes written into the target
    pages_changed: int


def changed_runs(new: memoryview | bytearray, old: memoryview | bytearray, n_new: int,
                 n_old: int) -> list[tuple[int, int]]:
    """[start, end) byte runs of the pages in new[:n_new] that differ from old[:n_old]."""
    runs: list[tuple[int, int]] = []
    start = -1
    for i in range(0, n_new, PAGE):
        j = min(i + PAGE, n_new)
        differs = j > n_old or new[i:j] != old[i:j]
        if differs and start < 0:
            start = i
        elif not differs and start >= 0:
            runs.append((start, i))
            start = -1
    if start >= 0:
        runs.append((start, n_new))
    return runs


def page_delta(sfd: int, ofd: int, tfd: int, new_size: int, old_size: int, buffers: BufferPool,
               hasher: blake3.blake3 | None, cancelled: Callable[[], bool]) -> DeltaResult:
    """Make tfd (holding the old content) equal to sfd; ofd reads the old content."""
    sbuf = buffers.get(0)
    obuf = buffers.get(1)
    block = len(sbuf) - len(sbuf) % PAGE or len(sbuf)
    written = pages = 0
    off = 0
    while off < new_size:
        if cancelled():
            raise Cancelled
        want = min(block, new_size - off)
        n = read_source(sfd, sbuf[:want], off)
        if n < want:
            raise SourceChanged("it shrank while being copied")
        m = pread_full(ofd, obuf[:min(want, max(0, old_size - off))], off) if off < old_size else 0
        if hasher is not None:
            hasher.update(sbuf[:n])
        # bytearray comparison is one memcmp; most blocks of a lightly changed file are equal.
        same = m == n and (sbuf.obj == obuf.obj if n == len(sbuf) else sbuf[:n].tobytes() == obuf[:n].tobytes())
        if not same:
            a = sbuf.obj if isinstance(sbuf.obj, bytearray) else bytearray(sbuf)
            b = obuf.obj if isinstance(obuf.obj, bytearray) else bytearray(obuf)
            for s, e in changed_runs(a, b, n, m):
                pwrite_all(tfd, sbuf[s:e], off + s)
                written += e - s
                pages += (e - s + PAGE - 1) // PAGE
        off += n
    if old_size != new_size:
        os.ftruncate(tfd, new_size)
    return DeltaResult(written, pages)
