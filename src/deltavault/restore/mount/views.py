"""Random access to stored bytes: a file from its content references, a volume from its
block maps, a partition as a window of its volume.

A read finds the references it overlaps (a bisection for files, a division for volumes'
fixed blocks) and fetches only those, through the mount's cache; nothing before the
offset is read. A sequential reader gets the next references fetched ahead. ``Hole``
references are zeros and are reported as holes by ``seek`` (SEEK_DATA / SEEK_HOLE).
"""

from __future__ import annotations

import errno
import os
import threading
from bisect import bisect_right
from collections import OrderedDict
from itertools import accumulate
from typing import Protocol

from deltavault.errors import CorruptionError
from deltavault.model.content import ContentRef, Hole
from deltavault.model.volume import BlockMap, VolumeManifest
from deltavault.objects.volumes import load_segment_map
from deltavault.restore.mount.blobs import MountBlobs

READ_AHEAD = 4  # references fetched ahead of a sequential reader
MAPS_KEPT = 256  # block maps a volume view keeps decoded (each covers 64 MiB)


class View(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def seek(self, offset: int, whence: int) -> int: ...


def _nxio() -> OSError:
    return OSError(errno.ENXIO, os.strerror(errno.ENXIO))


class ContentView:
    """A file's bytes. The references must add up to its size, as restore requires."""

    def __init__(self, blobs: MountBlobs, refs: list[ContentRef], size: int) -> None:
        self.blobs = blobs
        self.refs = refs
        self.starts = [0, *accumulate(r.size for r in refs)]
        if self.starts[-1] != size:
            raise CorruptionError(f"the tree records {size} bytes but its content holds {self.starts[-1]}")
        self.size = size
        self._next = -1  # where a sequential reader reads next

    def allocated(self) -> int:
        return sum(r.size for r in self.refs if not isinstance(r, Hole))

    def _index(self, offset: int) -> int:
        return bisect_right(self.starts, offset) - 1

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        parts: list[bytes] = []
        i = self._index(offset)
        pos = offset
        while pos < end:
            ref, start = self.refs[i], self.starts[i]
            stop = min(end, start + ref.size)
            if stop > pos:
                if isinstance(ref, Hole):
                    parts.append(bytes(stop - pos))
                else:
                    data = self.blobs.ref_bytes(ref)
                    parts.append(data[pos - start:stop - start])
                pos = stop
            i += 1
        if offset == self._next:
            self.blobs.read_ahead(self.refs[i:i + READ_AHEAD])
        self._next = end
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def seek(self, offset: int, whence: int) -> int:
        if offset >= self.size or offset < 0:
            raise _nxio()
        for i in range(self._index(offset), len(self.refs)):
            if isinstance(self.refs[i], Hole) == (whence == os.SEEK_HOLE) and self.refs[i].size:
                return max(offset, self.starts[i])
        if whence == os.SEEK_HOLE:
            return self.size  # the implicit hole at the end
        raise _nxio()


class VolumeView:
    """A volume snapshot's image: fixed-size blocks, their references in one block map per
    64 MiB segment, each map read when first needed."""

    def __init__(self, blobs: MountBlobs, manifest: VolumeManifest) -> None:
        self.blobs = blobs
        self.m = manifest
        self.size = manifest.size
        self.bs = manifest.block_size
        self.per_segment = manifest.segment_pages * manifest.page_size // manifest.block_size
        self._maps: OrderedDict[int, BlockMap] = OrderedDict()
        self._lock = threading.Lock()
        self._next = -1

    def _block_map(self, seg: int) -> BlockMap:
        with self._lock:
            bm = self._maps.get(seg)
            if bm is not None:
                self._maps.move_to_end(seg)
                return bm
        bm = load_segment_map(self.blobs, self.m, seg)
        with self._lock:
            self._maps[seg] = bm
            while len(self._maps) > MAPS_KEPT:
                self._maps.popitem(last=False)
        return bm

    def ref(self, block: int) -> ContentRef:
        seg, k = divmod(block, self.per_segment)
        return self._block_map(seg).refs[k]

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            block = pos // self.bs
            start = block * self.bs
            stop = min(end, start + self.bs)
            ref = self.ref(block)
            if isinstance(ref, Hole):
                parts.append(bytes(stop - pos))
            else:
                parts.append(self.blobs.ref_bytes(ref)[pos - start:stop - start])
            pos = stop
        if offset == self._next:
            last = (end - 1) // self.bs
            blocks = range(last + 1, min(last + 1 + READ_AHEAD, -(-self.size // self.bs)))
            self.blobs.read_ahead([self.ref(b) for b in blocks])
        self._next = end
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def seek(self, offset: int, whence: int) -> int:
        if offset >= self.size or offset < 0:
            raise _nxio()
        blocks = -(-self.size // self.bs)
        for b in range(offset // self.bs, blocks):
            if isinstance(self.ref(b), Hole) == (whence == os.SEEK_HOLE):
                return max(offset, b * self.bs)
        if whence == os.SEEK_HOLE:
            return self.size
        raise _nxio()


class WindowView:
    """``size`` bytes of another view from ``offset``: one partition of a disk image."""

    def __init__(self, parent: View, offset: int, size: int) -> None:
        self.parent = parent
        self.offset = offset
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        return self.parent.read(self.offset + offset, length) if length > 0 else b""

    def seek(self, offset: int, whence: int) -> int:
        if offset >= self.size or offset < 0:
            raise _nxio()
        try:
            found = self.parent.seek(self.offset + offset, whence) - self.offset
        except OSError:
            found = self.size if whence == os.SEEK_HOLE else -1
        if found >= self.size or found < 0:
            if whence == os.SEEK_HOLE:
                return self.size
            raise _nxio()
        return found
