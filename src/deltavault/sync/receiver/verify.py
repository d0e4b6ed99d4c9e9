"""--verify: what was written is read back from the disk, past the page cache, and its
BLAKE3 compared with the digest of the bytes meant; a file that differs is kept aside."""

from __future__ import annotations

import errno
import mmap
import os

import blake3

from deltavault.fs.dirfd import Identity, expect_identity, fd_path
from deltavault.fs.paths import display
from deltavault.sync.receiver.temps import aside_name


def verify_written(dfd: int, current: bytes, name: bytes, want: Identity, size: int, digest: bytes,
                   bufsize: int) -> tuple[int, str | None]:
    """Read back what was written (the file ``want``, now under ``current``), past the page
    cache: (bytes read, None) when it is what was meant, else (bytes read, the problem), the
    file having been renamed aside."""
    h, _ = expect_identity(dfd, current, want)
    try:
        got, n, method = read_back(fd_path(h), bufsize)
    finally:
        os.close(h)
    if n == size and got == digest:
        return n, None
    aside = aside_name(name)
    os.rename(current, aside, src_dir_fd=dfd, dst_dir_fd=dfd)
    return n, f"read back ({method}) {n} bytes that differ from what was written; kept aside as {display(aside)}"


def read_back(path: bytes, bufsize: int) -> tuple[bytes, int, str]:
    """BLAKE3 and length of a file as stored: O_DIRECT where the file system allows it,
    else (e.g. tmpfs) after dropping its cached pages. Returns (digest, bytes, method).
    ``path`` names the file itself (``/proc/self/fd/N`` of a checked handle: fs.dirfd).
    The caller has fsynced the file."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    method = "direct"
    try:
        fd = os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fd = os.open(path, flags)
        method = "fadvise"
    h = blake3.blake3()
    total = 0
    size = max(4096, bufsize - bufsize % 4096)
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    mv = memoryview(buf)
    try:
        if method == "fadvise":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while True:
            try:
                n = os.preadv(fd, [mv], total)
            except OSError as exc:
                if exc.errno != errno.EINVAL or method != "direct":
                    raise
                # Some file systems accept O_DIRECT at open but not for this read.
                os.close(fd)
                fd = os.open(path, flags)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                method, h, total = "fadvise", blake3.blake3(), 0
                continue
            if n == 0:
                break
            h.update(mv[:n])
            total += n
    finally:
        mv.release()
        buf.close()
        os.close(fd)
    return h.digest(), total, method
