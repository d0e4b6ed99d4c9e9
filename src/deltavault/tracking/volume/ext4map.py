"""Where an ext4 inode's blocks are: its extent tree or block map, walked with bounds.

The guest of a VM disk writes every byte of it, so the mapping is untrusted: an extent
tree may loop, be deeper than ext4 allows, or fan out into the same blocks again and again
(340 entries per node, five levels: 340^5 leaves from a handful of blocks), and a run may
point past the file system. dissect.extfs follows all of that (recursion, lists built in
memory). Here every tree or indirect block is visited at most once in the whole scan (a
block reached twice is refused: two owners cannot share it), depths are checked, and
every block named lies inside the file system, so the work is bounded by the volume's size.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from dissect.extfs.c_ext import c_ext

from deltavault.tracking.volume.base import Rejected

EXTENT_MAGIC = 0xF30A
MAX_DEPTH = 5  # EXT4_MAX_EXTENT_DEPTH
UNINIT_LEN = 0x8000
_HEADER = struct.Struct("<HHHHI")  # eh_magic, eh_entries, eh_max, eh_depth, eh_generation
_ENTRY = struct.Struct("<IHHI")  # extent: ee_block, ee_len, ee_start_hi, ee_start_lo
_INDEX = struct.Struct("<IIHH")  # index: ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused
N_DIRECT: int = c_ext.EXT2_NDIR_BLOCKS  # direct block pointers in i_block

Runs = list[tuple[int, int]]


class Mapper:
    """Walks inodes' mappings over one file system; remembers every tree block it read."""

    def __init__(self, read_block: Callable[[int], bytes], block_size: int, first: int, block_count: int) -> None:
        self.read_block = read_block
        self.bs = block_size
        self.first = first
        self.end = block_count
        self.seen: set[int] = set()

    def _check(self, inum: int, start: int, count: int, what: str) -> None:
        if start < self.first or count < 0 or start + count > self.end:
            raise Rejected(f"inode {inum}: {what} {start}+{count} lies outside the file system "
                           f"(blocks {self.first} to {self.end - 1})")

    def _node(self, inum: int, block: int) -> bytes:
        self._check(inum, block, 1, "mapping block")
        if block in self.seen:
            raise Rejected(f"inode {inum}: mapping block {block} is reached twice (a loop, or "
                           "a block claimed by two owners)")
        self.seen.add(block)
        return self.read_block(block)

    def extents(self, inum: int, iblock: bytes) -> tuple[Runs, list[int]]:
        """(data runs in logical order, tree blocks) of an extent-mapped inode."""
        runs: Runs = []
        nodes: list[int] = []
        stack: list[tuple[bytes, int | None]] = [(iblock, None)]
        while stack:
            buf, want_depth = stack.pop()
            magic, entries, most, depth, _gen = _HEADER.unpack_from(buf, 0)
            if magic != EXTENT_MAGIC:
                raise Rejected(f"inode {inum}: bad extent header")
            if depth > MAX_DEPTH or (want_depth is not None and depth != want_depth):
                raise Rejected(f"inode {inum}: extent tree depth {depth} where "
                               f"{MAX_DEPTH if want_depth is None else want_depth} at most is possible")
            if entries > most or 12 + 12 * entries > len(buf):
                raise Rejected(f"inode {inum}: {entries} extent entries do not fit their node")
            if depth == 0:
                for k in range(entries):
                    _lblk, ln, hi, lo = _ENTRY.unpack_from(buf, 12 + 12 * k)
                    n = ln - UNINIT_LEN if ln > UNINIT_LEN else ln
                    self._check(inum, hi << 32 | lo, n, "extent")
                    runs.append((hi << 32 | lo, n))
                continue
            children = []
            for k in range(entries):
                _lblk, lo, hi, _unused = _INDEX.unpack_from(buf, 12 + 12 * k)
                child = hi << 32 | lo
                children.append((self._node(inum, child), depth - 1))
                nodes.append(child)
            stack.extend(reversed(children))  # depth first, in logical order
        return runs, nodes

    def block_map(self, inum: int, iblock: bytes) -> tuple[Runs, list[int]]:
        """(data runs in logical order, indirect blocks) of a block-mapped (ext2/3) inode."""
        ptrs = struct.unpack_from("<15I", iblock)
        blocks: list[int] = []
        nodes: list[int] = []
        per = self.bs // 4
        for b in ptrs[:N_DIRECT]:
            if b:
                self._check(inum, b, 1, "block")
            blocks.append(b)
        for level, top in enumerate(ptrs[N_DIRECT:], start=1):
            frontier = [top] if top else []
            for _ in range(level):
                nxt: list[int] = []
                for node in frontier:
                    raw = self._node(inum, node)
                    nodes.append(node)
                    nxt.extend(p for p in struct.unpack_from(f"<{per}I", raw) if p)
                frontier = nxt
            for b in frontier:
                self._check(inum, b, 1, "block")
            blocks.extend(frontier)
        runs: Runs = []
        for b in blocks:
            if not b:
                continue
            if runs and runs[-1][0] + runs[-1][1] == b:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((b, 1))
        return runs, nodes
