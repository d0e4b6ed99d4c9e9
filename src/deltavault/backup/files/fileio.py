"""Reading an open file exactly: a file that shrinks while it is read raises ``FileChanged``,
and the archiver reads it again."""

from __future__ import annotations

import os

# Bytes read at a time from a large file. Chunks are views of the window they were cut from,
# so windows stay in memory while their chunks wait for the workers: 4 MiB (from 8) cut the
# backup's peak memory and measured no slower (docs/benchmarks.md, Memory). The streaming
# chunker needs a window of at least the largest chunk for boundaries that do not depend
# on it (``window_for``: twice the chunker's maximum when that is larger).
WINDOW = 4 * 1024 * 1024


def window_for(max_chunk: int) -> int:
    """The read window for a chunker whose largest chunk is ``max_chunk``."""
    return max(WINDOW, 2 * max_chunk)


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
