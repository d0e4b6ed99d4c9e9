"""Reading an open file exactly: a file that shrinks while it is read raises ``FileChanged``,
and the archiver reads it again."""

from __future__ import annotations

import os

WINDOW = 8 * 1024 * 1024  # bytes read at a time from a large file


class FileChanged(Exception):
    """The file changed size while being read; the caller retries."""


def read_exact(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        piece = os.pread(fd, length - got, offset + got)
        if not piece:
            raise FileChanged("file shrank while being read")
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)
