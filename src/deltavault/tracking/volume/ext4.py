"""ext4 (and ext2/3) metadata through dissect.extfs: what is allocated, and a digest per inode.

The digest of an inode covers everything but its access time and checksums: mode, size,
times (ctime and mtime to the nanosecond), links, flags, block count, generation, the extent
tree root kept in the inode, and for deeper extent trees (or block-mapped files) the whole
mapping. A file whose content changes gets a new mtime and ctime, and a remapped file a new
mapping, so an unchanged digest means its data blocks hold what they held last time; but
for a file changed in the second the volume was captured, whose digest is stored as one
that matches nothing (racy.py).

Blocks no digest vouches for are read: superblocks and group descriptors, bitmaps, inode
tables, extent tree and xattr blocks, the journal, and the data of changed inodes.
"""

from __future__ import annotations

import stat
import struct
from typing import Any

import blake3
from dissect.extfs import ExtFS
from dissect.extfs.c_ext import c_ext
from pyroaring import BitMap

from deltavault.model.content import PAGE_SIZE
from deltavault.model.volume import FsInfo
from deltavault.tracking.volume import pagesets
from deltavault.tracking.volume.base import Allocation, DigestScan, refuse_shared
from deltavault.tracking.volume.ext4map import Mapper, Runs
from deltavault.tracking.volume.racy import Racy
from deltavault.tracking.volume.readers import ReaderFile, VolumeReader

DIGEST = 16
_OFF = {name: f.offset for name, f in c_ext.ext4_inode.fields.items()}
# Everything but i_atime, i_checksum_lo/hi, i_extra_isize and the extra atime/crtime.
_DIGEST_SLICES = ((_OFF["i_mode"], _OFF["i_atime"]), (_OFF["i_ctime"], _OFF["i_checksum_lo"]),
                  (_OFF["i_ctime_extra"], _OFF["i_atime_extra"]))
RESIZE_INO: int = c_ext.EXT2_RESIZE_INO  # bound once: a cstruct lookup costs ~0.7 us an inode

# Not named by dissect (fs/ext4/ext4.h).
BG_INODE_UNINIT = 0x1
BG_BLOCK_UNINIT = 0x2
STATE_ERROR_FS = 0x2
COMPAT_FAST_COMMIT = 0x0400
COMPAT_STABLE_INODES = 0x0800
COMPAT_ORPHAN_FILE = 0x1000
RO_COMPAT_VERITY = 0x8000
INCOMPAT_CASEFOLD = 0x20000
SB_ORPHAN_FILE_INUM = 0x280  # s_orphan_file_inum, past the fields dissect parses

KNOWN_COMPAT = (c_ext.EXT2_FEATURE_COMPAT_DIR_PREALLOC | c_ext.EXT2_FEATURE_COMPAT_IMAGIC_INODES
                | c_ext.EXT3_FEATURE_COMPAT_HAS_JOURNAL | c_ext.EXT2_FEATURE_COMPAT_EXT_ATTR
                | c_ext.EXT2_FEATURE_COMPAT_RESIZE_INODE | c_ext.EXT2_FEATURE_COMPAT_DIR_INDEX
                | COMPAT_FAST_COMMIT | COMPAT_STABLE_INODES | COMPAT_ORPHAN_FILE)
KNOWN_RO_COMPAT = (c_ext.EXT2_FEATURE_RO_COMPAT_SPARSE_SUPER | c_ext.EXT2_FEATURE_RO_COMPAT_LARGE_FILE
                   | c_ext.EXT2_FEATURE_RO_COMPAT_BTREE_DIR | c_ext.EXT2_FEATURE_RO_COMPAT_HUGE_FILE
                   | c_ext.EXT4_FEATURE_RO_COMPAT_GDT_CSUM | c_ext.EXT4_FEATURE_RO_COMPAT_DIR_NLINK
                   | c_ext.EXT4_FEATURE_RO_COMPAT_EXTRA_ISIZE | c_ext.EXT4_FEATURE_RO_COMPAT_QUOTA
                   | c_ext.EXT4_FEATURE_RO_COMPAT_METADATA_CSUM | c_ext.EXT4_FEATURE_RO_COMPAT_READONLY
                   | c_ext.EXT4_FEATURE_RO_COMPAT_PROJECT | RO_COMPAT_VERITY)
KNOWN_INCOMPAT = (c_ext.EXT2_FEATURE_INCOMPAT_FILETYPE | c_ext.EXT4_FEATURE_INCOMPAT_EXTENTS
                  | c_ext.EXT4_FEATURE_INCOMPAT_64BIT | c_ext.EXT4_FEATURE_INCOMPAT_MMP
                  | c_ext.EXT4_FEATURE_INCOMPAT_FLEX_BG | c_ext.EXT4_FEATURE_INCOMPAT_CSUM_SEED
                  | c_ext.EXT4_FEATURE_INCOMPAT_LARGEDIR | c_ext.EXT4_FEATURE_INCOMPAT_INLINE_DATA
                  | c_ext.EXT4_FEATURE_INCOMPAT_ENCRYPT | INCOMPAT_CASEFOLD)


def probe(reader: VolumeReader) -> bool:
    if reader.size < 2048:
        return False
    buf = bytearray(2)
    reader.read_into(memoryview(buf), 1024 + c_ext.ext4_super_block.fields["s_magic"].offset)
    return int.from_bytes(buf, "little") == int(c_ext.EXT2_FS_MAGIC)


class Ext4Scanner:
    kind = "ext4"

    def __init__(self, reader: VolumeReader) -> None:
        self.reader = reader
        self.fh = ReaderFile(reader)
        self.fs = ExtFS(self.fh)
        sb = self.fs.sb
        self.sb = sb
        self.bs = self.fs.block_size
        self.info = FsInfo(type="ext4", uuid=str(self.fs.uuid), unit=self.bs, units=self.fs.block_count)
        self.groups = [self.fs._read_group_desc(g) for g in range(self.fs.groups_count)]
        self.wide = self.fs._group_desc_struct == c_ext.ext4_group_desc
        self._alloc: Allocation | None = None
        self._metadata: BitMap | None = None
        self.distrust = self._why_not_trusted()

    # ------------------------------------------------------------------ trust
    def _why_not_trusted(self) -> str:
        sb = self.sb
        bits = 8 * self.bs  # a group's block and inode bitmaps are one block each
        isz = sb.s_inode_size
        if not (0 < sb.s_blocks_per_group <= bits and 0 < sb.s_inodes_per_group <= bits
                and 128 <= isz <= self.bs and not isz & (isz - 1)):
            # The kernel refuses to mount these (ext4_fill_super); an inode table sized
            # by them was read whole, as big as the volume.
            return (f"impossible geometry: {sb.s_blocks_per_group} blocks and {sb.s_inodes_per_group} "
                    f"inodes per group, {isz}-byte inodes, {self.bs}-byte blocks")
        if sb.s_feature_incompat & c_ext.EXT3_FEATURE_INCOMPAT_RECOVER:
            return ("the journal needs recovery (mounted read-write, or not cleanly unmounted): the "
                    "metadata on disk is not current")
        if sb.s_state & STATE_ERROR_FS:
            return "the file system is marked as having errors"
        unknown = [(name, flags & ~known) for name, flags, known in (
            ("compat", sb.s_feature_compat, KNOWN_COMPAT),
            ("ro_compat", sb.s_feature_ro_compat, KNOWN_RO_COMPAT),
            ("incompat", sb.s_feature_incompat, KNOWN_INCOMPAT)) if flags & ~known]
        if unknown:
            return "unsupported ext4 features: " + ", ".join(f"{n} 0x{v:x}" for n, v in unknown)
        if self.bs * self.fs.block_count > self.reader.size:
            return f"the file system ({self.bs * self.fs.block_count} bytes) is larger than the volume"
        return ""

    # ------------------------------------------------------------------ helpers
    def _gd(self, gd: Any, name: str) -> int:
        lo = int(getattr(gd, f"{name}_lo"))
        return (int(getattr(gd, f"{name}_hi")) << 32 | lo) if self.wide else lo

    def _read(self, block: int, count: int = 1) -> bytes:
        return self.fh.pread(block * self.bs, count * self.bs)

    def _add_blocks(self, bm: BitMap, start: int, count: int, *, outward: bool) -> None:
        pagesets.add_bytes(bm, start * self.bs, (start + count) * self.bs, outward=outward)

    def _has_super(self, group: int) -> bool:
        if group <= 1 or not self.sb.s_feature_ro_compat & c_ext.EXT2_FEATURE_RO_COMPAT_SPARSE_SUPER:
            return True
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def _special_inodes(self) -> set[int]:
        """Inodes whose blocks change without their times changing: reserved inodes (the
        journal, the resize inode), quota files, the orphan file."""
        sb = self.sb
        out = set(range(1, sb.s_first_ino))
        out.update(n for n in (sb.s_journal_inum, sb.s_usr_quota_inum, sb.s_grp_quota_inum,
                               sb.s_prj_quota_inum, sb.s_snapshot_inum) if n)
        if sb.s_feature_compat & COMPAT_ORPHAN_FILE:
            raw = self.fh.pread(1024 + SB_ORPHAN_FILE_INUM, 4)
            out.add(int.from_bytes(raw, "little"))
        return out

    # ------------------------------------------------------------------ allocation
    def allocation(self) -> Allocation:
        if self._alloc is None:
            self._alloc = self._allocation()
        return self._alloc

    def _allocation(self) -> Allocation:
        sb = self.sb
        bpg = sb.s_blocks_per_group
        first = sb.s_first_data_block
        total = self.fs.block_count
        # Group metadata is in use whatever the group's own bitmap says (and a
        # BLOCK_UNINIT group has no bitmap on disk).
        alloc = self._group_metadata().copy()
        for g, gd in enumerate(self.groups):
            start = first + g * bpg
            nblocks = min(bpg, total - start)
            if gd.bg_flags & BG_BLOCK_UNINIT:
                continue
            bitmap = self._read(self._gd(gd, "bg_block_bitmap"))
            for s, e in pagesets.set_bit_runs(bitmap, nblocks):
                self._add_blocks(alloc, start + s, e - s, outward=True)
        fs_pages = total * self.bs // PAGE_SIZE
        return Allocation(self.info, fs_pages, alloc)

    def _group_metadata(self) -> BitMap:
        """Pages of the superblocks, group descriptors, bitmaps and inode tables: walked
        once per scanner (a run uses them for the allocation and for the digest scan)."""
        if self._metadata is None:
            self._metadata = self._walk_groups()
        return self._metadata

    def _walk_groups(self) -> BitMap:
        sb = self.sb
        out = BitMap()
        gdt_blocks = -(-len(self.groups) * self.fs._group_desc_size // self.bs)
        itable_blocks = -(-sb.s_inodes_per_group * sb.s_inode_size // self.bs)
        for g, gd in enumerate(self.groups):
            if self._has_super(g):
                start = sb.s_first_data_block + g * sb.s_blocks_per_group
                self._add_blocks(out, start, 1 + gdt_blocks + sb.s_reserved_gdt_blocks, outward=True)
            self._add_blocks(out, self._gd(gd, "bg_block_bitmap"), 1, outward=True)
            self._add_blocks(out, self._gd(gd, "bg_inode_bitmap"), 1, outward=True)
            self._add_blocks(out, self._gd(gd, "bg_inode_table"), itable_blocks, outward=True)
        if sb.s_first_data_block:  # 1 KiB blocks: block 0 (the boot block) lies before the first group
            self._add_blocks(out, 0, sb.s_first_data_block, outward=True)
        return out

    # ------------------------------------------------------------------ inode digests
    def _inode_tables(self) -> Any:
        """(inode number, raw inode) for every inode the inode bitmaps mark in use."""
        sb = self.sb
        ipg, isz = sb.s_inodes_per_group, sb.s_inode_size
        csum = sb.s_feature_ro_compat & (c_ext.EXT4_FEATURE_RO_COMPAT_GDT_CSUM
                                          | c_ext.EXT4_FEATURE_RO_COMPAT_METADATA_CSUM)
        for g, gd in enumerate(self.groups):
            if gd.bg_flags & BG_INODE_UNINIT:
                continue
            used = ipg
            if csum:
                unused = gd.bg_itable_unused_lo | ((gd.bg_itable_unused_hi << 16) if self.wide else 0)
                used = max(0, ipg - unused)
            if used == 0:
                continue
            ibitmap = self._read(self._gd(gd, "bg_inode_bitmap"))
            table = self.fh.pread(self._gd(gd, "bg_inode_table") * self.bs, used * isz)
            for s, e in pagesets.set_bit_runs(ibitmap, used):
                for idx in range(s, e):
                    yield g * ipg + idx + 1, table[idx * isz:(idx + 1) * isz]

    def _mapping(self, mapper: Mapper, inum: int, raw: bytes, ftype: int, flags: int) -> tuple[Runs, list[int]]:
        """(data runs, mapping blocks) of any inode that has blocks: files, symlinks,
        directories and the reserved inodes; none for inline data and fast symlinks. The
        resize inode's blocks are the reserved descriptor blocks, group metadata already.
        ``ftype`` and ``flags`` are the inode's S_IFMT bits and i_flags."""
        iblock = raw[_OFF["i_block"]:_OFF["i_block"] + 60]
        if inum == RESIZE_INO or flags & c_ext.EXT4_INLINE_DATA_FL or not any(iblock):
            return [], []
        if ftype not in (stat.S_IFREG, stat.S_IFLNK, stat.S_IFDIR) and inum >= self.sb.s_first_ino:
            return [], []  # devices, FIFOs, sockets
        if flags & c_ext.EXT4_EXTENTS_FL:
            return mapper.extents(inum, iblock)
        size = int.from_bytes(raw[4:8], "little")
        blocks = int.from_bytes(raw[_OFF["i_blocks_lo"]:_OFF["i_blocks_lo"] + 4], "little")
        if ftype == stat.S_IFLNK and size < 60 and blocks == 0:
            return [], []  # fast symlink: the target is in i_block
        return mapper.block_map(inum, iblock)

    def _superblock_times(self) -> list[int]:
        """The last write and mount times (s_wtime, s_mtime, with their high bytes)."""
        raw = self.fh.pread(1024, 1024)
        return [int.from_bytes(raw[lo:lo + 4], "little") | raw[hi] << 32 for lo, hi in ((48, 0x274), (44, 0x275))]

    @staticmethod
    def _ctime(raw: bytes) -> int:
        """An inode's ctime in seconds (with the epoch bits of i_ctime_extra, if it has them)."""
        sec = int.from_bytes(raw[_OFF["i_ctime"]:_OFF["i_ctime"] + 4], "little", signed=True)
        extra = int.from_bytes(raw[_OFF["i_extra_isize"]:_OFF["i_extra_isize"] + 2], "little") if len(raw) > 128 else 0
        if _OFF["i_extra_isize"] + extra >= _OFF["i_ctime_extra"] + 4:
            sec += (int.from_bytes(raw[_OFF["i_ctime_extra"]:_OFF["i_ctime_extra"] + 4], "little") & 3) << 32
        return sec

    def digest_scan(self, prev: dict[int, bytes] | None) -> DigestScan:
        special = self._special_inodes()
        digests: dict[int, bytes] = {}
        racy = Racy(self._superblock_times())
        mapper = Mapper(self._read, self.bs, self.sb.s_first_data_block, self.fs.block_count)
        unchanged = BitMap()
        others = self._group_metadata().copy()  # every page some other owner has a block in
        changed = files = 0
        for inum, raw in self._inode_tables():
            h = blake3.blake3()
            for s, e in _DIGEST_SLICES:
                h.update(raw[s:e])
            ftype = stat.S_IFMT(int.from_bytes(raw[0:2], "little"))
            flags = int.from_bytes(raw[_OFF["i_flags"]:_OFF["i_flags"] + 4], "little")
            runs, nodes = self._mapping(mapper, inum, raw, ftype, flags)
            for b in nodes:
                self._add_blocks(others, b, 1, outward=True)
            acl = (int.from_bytes(raw[_OFF["i_file_acl_lo"]:_OFF["i_file_acl_lo"] + 4], "little")
                   | int.from_bytes(raw[_OFF["i_file_acl_high"]:_OFF["i_file_acl_high"] + 2], "little") << 32)
            if acl:
                self._add_blocks(others, acl, 1, outward=True)  # the xattr block
            data = inum not in special and ftype in (stat.S_IFREG, stat.S_IFLNK)
            if runs and data and (nodes or not flags & c_ext.EXT4_EXTENTS_FL):
                # A deep tree or a block map: the mapping below the inode is not in the
                # slices above.
                h.update(struct.pack(f"<{2 * len(runs)}Q", *(x for run in runs for x in run)))
            d = h.digest(DIGEST)
            digests[inum] = d
            if inum not in special:  # (the reserved inodes are not counted as files)
                racy.see(inum, self._ctime(raw))
                files += 1
                if prev is None or prev.get(inum) != d:
                    changed += 1
                    data = False
            # Blocks of changed files and of what is always read (directories, the
            # journal, quota files) are claimed by them; an unchanged file's vouched for.
            for start, count in runs:
                if data:
                    self._add_blocks(unchanged, start, count, outward=False)
                else:
                    self._add_blocks(others, start, count, outward=True)
        racy.mark(digests)  # a digest no file's equals, for those its times cannot vouch for
        refuse_shared(unchanged, others, "block", self.bs)
        # Everything no unchanged file vouches for: free space and whatever lies past
        # the file system too (free space is left out later, if it is skipped).
        everything = pagesets.span(0, pagesets.pages_of(self.reader.size))
        return DigestScan(digests, everything - unchanged, objects=files, changed_objects=changed)
