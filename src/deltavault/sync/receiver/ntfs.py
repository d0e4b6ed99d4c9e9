"""The receiving side's part of NTFS metadata: set what SRC's ntfs-3g mount gave onto DST's
entry when DST is ntfs-3g too, or name what DST cannot keep; named streams written as the
file ``tmp:stream`` (checked to be the inode just written). (Onto other file systems streams
travel as ``user.`` xattrs, with the other xattrs.)"""

from __future__ import annotations

import errno
import os

from deltavault.fs.ntfs import (
    WINDOWS,
    NtfsView,
    ReadResult,
    apply_meta,
)

_STREAM_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class NtfsDest:
    """``view``: DST's ntfs-3g view, None when DST is not on ntfs-3g."""

    def __init__(self, view: NtfsView | None) -> None:
        self.view = view

    @property
    def file_streams(self) -> bool:
        """Streams are written as files ``name:stream`` (any size)."""
        return self.view is not None and self.view.streams == WINDOWS

    def apply(self, target: int | bytes, meta: ReadResult) -> tuple[list[str], list[str]]:
        """Descriptor, reparse data, attributes and times onto ``target`` (after its POSIX
        metadata). Returns (problems, what DST cannot keep)."""
        if self.view is None:
            lost = [what for what, has in (("security descriptor", bool(meta.sd)),
                                           ("DOS attributes", meta.attrib is not None),
                                           ("creation time", bool(meta.times)),
                                           ("reparse data", bool(meta.reparse))) if has]
            return [], lost
        return apply_meta(target, meta, last=False) + apply_meta(target, meta, last=True), []

    def same(self, src: ReadResult, dst: ReadResult) -> bool:
        """DST already has SRC's NTFS metadata (the change time, NTFS's own, aside)."""
        return (src.sd, src.attrib, src.times[:24], src.reparse) == (dst.sd, dst.attrib, dst.times[:24], dst.reparse)

    def open_stream(self, dfd: int, tmp: bytes, fd: int, stream: bytes) -> int:
        """The stream ``stream`` of the file written as ``tmp`` in ``dfd`` (open as ``fd``),
        open for writing."""
        sfd = os.open(tmp + b":" + stream, _STREAM_FLAGS, 0o600, dir_fd=dfd)
        if os.fstat(sfd).st_ino != os.fstat(fd).st_ino:
            os.close(sfd)
            raise OSError(errno.ESTALE, "the file was replaced while its streams were written")
        return sfd
