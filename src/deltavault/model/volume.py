"""Volume snapshots: the manifest (a META blob) and the pieces it names.

A volume is cut into segments of ``SEGMENT_PAGES`` 4 KiB pages (64 MiB). Each segment has
one block map blob (the content references of its fixed-size blocks) and one page-digest
blob (16 bytes per page). An incremental run rewrites only the segments that changed, so an
unchanged segment costs two ids in the manifest. See docs/design.md, "Volume snapshots".
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec

from deltavault.errors import FormatError, Undecodable, UnsupportedVersion
from deltavault.framing import decode_msgpack
from deltavault.model.content import PAGE_SIZE, ContentRef, Count

VOLUME_VERSION = 1
SEGMENT_PAGES = 16384  # 64 MiB of volume per segment


class Checkpoint(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a change source needs to answer "what changed since this run" next time."""

    source: str  # "fs-digests" | "qemu-bitmap" | "btrfs"
    id: str  # random per run; the next run checks it against the source's own handle
    token: str = ""  # the source's handle: bitmap name, snapshot path
    uuid: str = ""  # file-system or snapshot uuid the state belongs to
    state: list[bytes] = []  # META blobs holding the source's state (metadata digests)


class FsInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: str  # "ext4" | "ntfs"
    uuid: str = ""
    unit: int = 4096  # block or cluster size
    units: int = 0  # blocks or clusters the file system covers


class Partition(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A partition of the volume, or (number 0) a file system covering it from offset 0; for
    reports (a snapshot summary's ``blocks``)."""

    number: int
    offset: int  # bytes
    size: int
    fs: str = ""  # ext4 | ntfs when a trusted file system was found in it


class Segment(msgspec.Struct, array_like=True, frozen=True):
    map: bytes  # META blob: BlockMap
    digests: bytes  # META blob: 16-byte page digests, one per page of the segment


class BlockMap(msgspec.Struct, kw_only=True):
    first: int  # index of the segment's first block
    refs: list[ContentRef]  # one per block; the last block of the volume may be short
    v: int = VOLUME_VERSION


class VolumeManifest(msgspec.Struct, kw_only=True, omit_defaults=True):
    size: Count  # bytes
    block_size: Annotated[int, msgspec.Meta(ge=4096, le=4 << 20)]  # a power of two (``decode``)
    segments: list[Segment]
    page_size: Annotated[int, msgspec.Meta(ge=PAGE_SIZE, le=PAGE_SIZE)] = PAGE_SIZE
    segment_pages: Annotated[int, msgspec.Meta(ge=1)] = SEGMENT_PAGES
    # Portable roaring bitmaps of page numbers. ``zero``: pages not read because they were
    # known to be zeros (holes of the source) or free; restored as zeros. ``free``: the
    # subset the file system called free, whose real content was not captured.
    zero: bytes = b""
    free: bytes = b""
    free_space: str = "skip"  # "skip" | "read"
    fs: FsInfo | None = None
    checkpoints: list[Checkpoint] = []
    # The image format the volume was read from: raw | qcow2 | vhdx | vmdk. Empty in
    # manifests written before it was recorded (read as raw). Restores may write it back.
    source_format: str = ""
    v: int = VOLUME_VERSION


class DigestState(msgspec.Struct, kw_only=True):
    """Metadata digests of one run (fs-digests checkpoint): parallel arrays, sorted."""

    fs: str
    uuid: str
    nums: bytes  # u64 LE: inode or MFT record numbers
    digests: bytes  # 16 bytes each
    v: int = VOLUME_VERSION


T = TypeVar("T")


def encode(obj: msgspec.Struct) -> bytes:
    return msgspec.msgpack.encode(obj)


def decode(raw: bytes, kind: type[T], what: str) -> T:
    try:
        obj = decode_msgpack(raw, kind)
    except Undecodable as exc:
        raise FormatError(f"{what} does not parse: {exc}") from exc
    if getattr(obj, "v", VOLUME_VERSION) != VOLUME_VERSION:
        raise UnsupportedVersion(f"{what} has format version {getattr(obj, 'v', '?')}; this build "
                                 f"reads {VOLUME_VERSION}")
    if isinstance(obj, VolumeManifest) and (why := _unsound(obj)):
        raise FormatError(f"{what} does not parse: {why}")
    return obj


def block_map_fault(m: VolumeManifest, seg: int, bm: BlockMap) -> str | None:
    """What makes ``bm`` not the block map of segment ``seg`` of ``m`` (None: nothing): it
    starts at the segment's first block and holds one reference of the block size for each
    block of the segment, the volume's last block short. Restore wrote each reference at
    ``first`` whatever its size: an 8 KiB volume restored as a 1 TiB image, exit 0."""
    per = m.segment_pages * m.page_size // m.block_size
    first, blocks = seg * per, -(-m.size // m.block_size)
    if bm.first != first or len(bm.refs) != min(per, blocks - first):
        return f"does not cover segment {seg}"
    for block, ref in enumerate(bm.refs, first):
        if ref.size != min(m.block_size, m.size - block * m.block_size):
            return f"gives block {block} a reference of {ref.size} bytes"
    return None


def _unsound(m: VolumeManifest) -> str | None:
    """What in a manifest no backup writes, that readers would divide by or index with: a
    block size that is not a power of two or does not divide a segment (the mount divided
    by zero), or another number of segments than the size needs (restore wrote zeros for
    the missing ones, the mount failed with IndexError)."""
    segment = m.segment_pages * m.page_size
    if m.block_size & (m.block_size - 1) or segment % m.block_size:
        return f"block size {m.block_size} does not divide a segment of {segment} bytes in powers of two"
    if len(m.segments) != -(-m.size // segment):
        return f"{len(m.segments)} segments for {m.size} bytes"
    return None


__all__ = ["SEGMENT_PAGES", "VOLUME_VERSION", "BlockMap", "Checkpoint", "DigestState", "FsInfo", "block_map_fault",
           "Partition", "Segment", "VolumeManifest", "decode", "encode"]
