"""A read-only, seekable request body over a range of an open file, for uploads that must
not hold the object in memory.

botocore reads a body for its checksum (CRC32), for the SigV4 payload hash over plain HTTP,
and to send it, each time a piece at a time, seeking back to the start in between; a retry
opens the range again from its start.
"""

from __future__ import annotations

import os

from deltavault.backends.base import pread_exact


class FileRange:
    """A read-only, seekable body over ``length`` bytes of the file open as ``fd`` from
    ``start``: what botocore needs to checksum, sign and send an upload, and rewind it,
    without the bytes in memory (its readers ask for 1 MiB or less at a time). Reads use pread (no shared file position), so the parts of
    a multipart upload read one file from several threads."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self.fd, self.start, self.length = fd, start, length
        self.pos = 0

    def __len__(self) -> int:
        return self.length

    def read(self, n: int = -1) -> bytes:
        left = self.length - self.pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        data = pread_exact(self.fd, n, self.start + self.pos, self.start + self.length)  # callers expect n
        self.pos += n
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence]
        self.pos = max(0, min(self.length, base + offset))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True
