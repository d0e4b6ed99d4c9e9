"""A directory's named streams on an ntfs-3g DST (``streams_interface=windows``), made
SRC's in place (a directory cannot be staged and renamed over as a file is), while it lies
in a directory of our own (fs/ntfsstage.py). Locally each
stream is copied from SRC's open stream through the sync's buffers, compared so first,
never held whole; from the wire it comes as bytes (sender/ntfs.py's DIR_STREAM_MAX)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Mapping

from deltavault.fs.clone import pread_full, pwrite_all
from deltavault.fs.ntfs import STREAMS_LIST, drop_cached, open_stream_file, valid_stream_name
from deltavault.fs.ntfsstage import private
from deltavault.fs.paths import display
from deltavault.sync.data import copy_upto, same_upto

Opener = Callable[[], int]  # opens a stream of SRC's for reading (the caller closes it)
STREAM_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def put_dir_streams(parent: int, name: bytes, fd: int, streams: Mapping[bytes, bytes | Opener],
                    bufs: tuple[memoryview, memoryview] | None = None) -> list[str]:
    """The named streams of the directory ``name`` of ``parent`` (open as ``fd``) made
    SRC's: each one that differs written (in place: a directory cannot be replaced by a
    rename), each one SRC does not have removed, while the directory lies in a directory
    of our own (fs/ntfsstage.py: ntfs-3g finds ``name:stream`` by path at every write). A
    stream is its bytes (from the wire, at most sender/ntfs.py's DIR_STREAM_MAX), or,
    locally, what opens SRC's stream: it is then compared and copied through ``bufs``,
    whatever its size, never held whole. Returns the problems."""
    try:
        have = [n for n in os.getxattr(fd, STREAMS_LIST).split(b"\0") if n]
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            return [f"its streams on DST cannot be listed: {exc.strerror or exc}; not copied"]
        have = []
    problems = [f"stream {display(s)}: name not valid on DST; not copied" for s in streams if not valid_stream_name(s)]
    if not have and not streams:
        return problems
    try:
        with private(parent, name, fd) as (pfd, pname):
            problems += _put_all(pfd, pname, fd, streams, have, bufs)
    except OSError as exc:
        problems.append(f"streams: {exc.strerror or exc}; not copied")
    for s in streams:  # (written under another path: pages cached under this one are stale)
        if valid_stream_name(s):
            with contextlib.suppress(OSError):
                os.close(open_stream_file(parent, name, s))
    return problems


def _put_all(parent: int, name: bytes, fd: int, streams: Mapping[bytes, bytes | Opener], have: list[bytes],
             bufs: tuple[memoryview, memoryview] | None) -> list[str]:
    problems: list[str] = []
    for s in have:
        if s not in streams and valid_stream_name(s):
            try:
                os.close(_check_stream(parent, name, fd, s, os.O_RDONLY))  # (ntfs-3g: EINVAL while open)
                os.unlink(name + b":" + s, dir_fd=parent)
            except OSError as exc:
                problems.append(f"stream {display(s)}: not removed: {exc.strerror or exc}")
    for s, data in sorted(streams.items()):
        if not valid_stream_name(s):
            continue
        src = -1
        try:
            if isinstance(data, bytes):
                _put_dir_stream(parent, name, fd, s, data, s in have, bufs)
            else:
                src = data()
                _put_dir_stream(parent, name, fd, s, src, s in have, bufs)
        except OSError as exc:
            problems.append(f"stream {display(s)}: {exc.strerror or exc}; not copied")
        finally:
            if src >= 0:
                drop_cached(src)
                os.close(src)
    return problems


def _put_dir_stream(parent: int, name: bytes, fd: int, s: bytes, data: bytes | int, have: bool,
                    bufs: tuple[memoryview, memoryview] | None) -> None:
    """One stream of a directory written unless DST has its bytes already: ``data``, or
    the open stream ``data`` up to its size now (compared and copied through ``bufs``)."""
    if not isinstance(data, bytes) and bufs is None:
        raise ValueError("a stream copied from SRC's needs buffers")
    size = len(data) if isinstance(data, bytes) else os.fstat(data).st_size

    def same(sfd: int) -> bool:
        if isinstance(data, bytes):
            return _same_bytes(sfd, data)
        return bufs is not None and same_upto(data, sfd, size, *bufs)

    if have:
        sfd = _check_stream(parent, name, fd, s, os.O_RDONLY)
        try:
            drop_cached(sfd)
            if os.fstat(sfd).st_size == size and same(sfd):
                return
        finally:
            os.close(sfd)
    sfd = _check_stream(parent, name, fd, s, STREAM_FLAGS)
    try:
        if isinstance(data, bytes):
            pwrite_all(sfd, data, 0)
        elif bufs is not None:
            copy_upto(data, sfd, size, bufs[0])
    finally:
        os.close(sfd)


def _check_stream(parent: int, name: bytes, fd: int, s: bytes, flags: int) -> int:
    """``name:s`` of ``parent`` opened, checked to belong to the object open as ``fd``."""
    sfd = os.open(name + b":" + s, flags, 0o600, dir_fd=parent)
    if os.fstat(sfd).st_ino != os.fstat(fd).st_ino:
        os.close(sfd)
        raise OSError(errno.ESTALE, "the directory was replaced while its streams were written")
    return sfd


def _same_bytes(fd: int, data: bytes) -> bool:
    buf = bytearray(len(data))
    return pread_full(fd, memoryview(buf), 0) == len(data) and buf == data
