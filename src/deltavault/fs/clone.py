"""Copy-on-write clones (reflinks) and whole-buffer I/O helpers."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h

# Errors meaning "this file system (or this pair of files) cannot clone", not a failure.
_NO_CLONE = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
             errno.ENOSYS, errno.EBADF}


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Make dst_fd share src_fd's blocks (btrfs, xfs with reflink, ...). False if unsupported."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in _NO_CLONE:
            return False
        raise
    return True


_libc: ctypes.CDLL | None = None


def preallocate(fd: int, offset: int, length: int) -> bool:
    """Allocate blocks for [offset, offset+length) of ``fd`` (fallocate(2), mode 0: the size
    grows, the range reads as zeros). False where the file system cannot; ENOSPC raises.
    Not os.posix_fallocate: where fallocate is missing, glibc emulates it by writing a
    byte in every block."""
    global _libc
    if length <= 0:
        return True
    libc = _libc
    if libc is None:
        # Published only once whole: restore workers call this at once, and one that saw the
        # handle before its argtypes were set would pass 64-bit offsets unconverted.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc = libc
    if libc.fallocate(fd, 0, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_CLONE:
        return False
    raise OSError(err, os.strerror(err))


def pread_full(fd: int, buf: memoryview, offset: int) -> int:
    """Fill buf from offset; fewer bytes only at end of file."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n
