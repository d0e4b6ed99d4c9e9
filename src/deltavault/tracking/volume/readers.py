"""Reading a volume: a block device, an image file, or (see qemu.py) an NBD export.

Every reader counts the bytes it reads from the source; that count is what the reports
and benchmarks call "bytes read".
"""

from __future__ import annotations

import ctypes
import errno
import io
import mmap
import os
import stat
from collections import OrderedDict
from typing import Protocol

from pyroaring import BitMap

from deltavault.errors import SourceError
from deltavault.fs.sparse import data_extents
from deltavault.model.content import PAGE_SIZE
from deltavault.tracking.volume import pagesets

DIRECT_ALIGN = 4096
SECTOR = 512


def _address(buf: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class VolumeReader(Protocol):
    size: int
    bytes_read: int
    description: str

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` exactly from ``offset``; SourceError if the volume is shorter."""
        ...

    def zero_pages(self) -> BitMap:
        """Pages known to read as zeros without reading them (holes). May be empty."""
        ...

    def close(self) -> None: ...


def volume_size(fd: int, path: str) -> int:
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise SourceError(f"{path} is neither a block device nor a regular file")


class FileReader:
    """An image file or a block device, read with pread.

    A block device is read with O_DIRECT. A mounted (frozen) file system writes its data and
    journal with I/O that bypasses the device's page cache, and keeps pages of it pinned
    (its superblocks), so a buffered read could return what a block held earlier.
    """

    def __init__(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot open {path}: {exc.strerror}") from exc
        self.fd = fd
        self.path = path
        self.description = path
        self.size = volume_size(fd, path)
        self.is_file = stat.S_ISREG(os.fstat(fd).st_mode)
        self.bytes_read = 0
        self.direct = False
        self._bounce: mmap.mmap | None = None
        if not self.is_file:
            try:
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
                os.close(fd)
                self.direct = True
            except OSError:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the next best thing

    def read_into(self, buf: memoryview, offset: int) -> None:
        if self.direct and (offset % DIRECT_ALIGN or len(buf) % SECTOR or _address(buf) % DIRECT_ALIGN):
            self._read_bounced(buf, offset)
        else:
            self._read(buf, offset)
        self.bytes_read += len(buf)

    def _read(self, buf: memoryview, offset: int) -> None:
        got = 0
        want = len(buf)
        while got < want:
            try:
                n = os.preadv(self.fd, [buf[got:]], offset + got)
            except OSError as exc:
                raise SourceError(f"{self.path}: read error at byte {offset + got}: {exc.strerror}",
                                  retryable=exc.errno in (errno.EINTR, errno.EAGAIN)) from exc
            if n == 0:
                raise SourceError(f"{self.path} ended at byte {offset + got}: it shrank during the backup")
            got += n

    def _read_bounced(self, buf: memoryview, offset: int) -> None:
        """O_DIRECT needs aligned buffers, offsets and lengths: go through an aligned copy."""
        start = offset - offset % DIRECT_ALIGN
        end = min(-(-(offset + len(buf)) // DIRECT_ALIGN) * DIRECT_ALIGN, -(-self.size // SECTOR) * SECTOR)
        if self._bounce is None or len(self._bounce) < end - start:
            self._bounce = mmap.mmap(-1, max(end - start, 1 << 20))  # page-aligned
        view = memoryview(self._bounce)
        try:
            self._read(view[:end - start], start)
            buf[:] = view[offset - start:offset - start + len(buf)]
        finally:
            view.release()

    def zero_pages(self) -> BitMap:
        if not self.is_file:
            return BitMap()
        holes = []
        pos = 0
        for off, ln in data_extents(self.fd, self.size):
            if off > pos:
                holes.append((pos, off - pos))
            pos = off + ln
        if pos < self.size:
            # The tail of the last page past the end reads as zeros too.
            holes.append((pos, pagesets.pages_of(self.size) * PAGE_SIZE - pos))
        return pagesets.from_byte_ranges(holes, outward=False)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None


class PositionedFile(io.RawIOBase):
    """A read-only, seekable file object of ``size`` bytes that parsers (file systems,
    partition tables) read through; subclasses say how bytes are read (``readinto``)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = 0

    @property
    def size(self) -> int:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos


class ReaderFile(PositionedFile):
    """A read-only file object over a VolumeReader, for the file-system parsers.

    Parsers read many small pieces (a superblock, one inode, an extent block); a page cache
    turns them into whole-page reads, so each metadata page is fetched (and counted) once.
    """

    def __init__(self, reader: VolumeReader, cache_pages: int = 16384) -> None:
        super().__init__()
        self.reader = reader
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_pages = cache_pages

    @property
    def size(self) -> int:
        return self.reader.size

    def _page(self, n: int) -> bytes:
        page = self._cache.get(n)
        if page is not None:
            self._cache.move_to_end(n)
            return page
        start = n * PAGE_SIZE
        length = min(PAGE_SIZE, self.reader.size - start)
        buf = bytearray(length)
        self.reader.read_into(memoryview(buf), start)
        page = bytes(buf)
        self._cache[n] = page
        if len(self._cache) > self._cache_pages:
            self._cache.popitem(last=False)
        return page

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.reader.size)
        if offset >= end:
            return b""
        parts = []
        for n in range(offset // PAGE_SIZE, (end - 1) // PAGE_SIZE + 1):
            page = self._page(n)
            s = max(offset - n * PAGE_SIZE, 0)
            e = min(end - n * PAGE_SIZE, len(page))
            parts.append(page[s:e])
        return b"".join(parts)

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.pread(self.pos, len(b))
        n = len(data)
        memoryview(b)[:n] = data
        self.pos += n
        return n
