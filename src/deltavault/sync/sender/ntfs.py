"""The sending side's view of NTFS metadata: a source entry's descriptor, attributes, times
and the names of its named streams (fs/ntfs.py), and a stream opened for reading as the file
``name:stream`` through a handle checked to be the same inode."""

from __future__ import annotations

import errno
import os

from deltavault.fs.dirfd import open_regular
from deltavault.fs.ntfs import NtfsView, ReadResult, read_meta


class NtfsSource:
    def __init__(self, view: NtfsView, *, streams: bool) -> None:
        self.view = view
        self.streams = streams

    def read(self, target: int | bytes) -> ReadResult:
        """Metadata of the open entry ``target`` (fd, or /proc/self/fd path of a handle)."""
        return read_meta(target, self.view, streams=self.streams)

    def open_stream(self, dir_fd: int, name: bytes, stream: bytes, ino: int) -> int:
        """The stream ``stream`` of the file ``name`` of ``dir_fd``, open for reading; it
        must belong to inode ``ino`` (the file being copied), else ESTALE."""
        fd = open_regular(dir_fd, name + b":" + stream)
        if os.fstat(fd).st_ino != ino:
            os.close(fd)
            raise OSError(errno.ESTALE, "the file was replaced while its streams were read")
        return fd
