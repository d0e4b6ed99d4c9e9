"""Where named streams are written on ntfs-3g: in a directory of our own.

ntfs-3g's high-level FUSE interface (the one with ``streams_interface=windows``) finds
``name:stream`` by its path again on every read and write of an open stream, not through
the inode it was opened on: once another user renames ``name`` away and renames a file of
theirs that has that stream to ``name``, the bytes written through a descriptor opened
(and checked to be our file's) before land in their file (seen on ntfs-3g 2022.10.3). A
check of the inode at open cannot help, nor can ``O_EXCL``. So the streams of a file
being staged (or of a directory, written in place) are written while it lies in a fresh
directory of ours, mode 0700, where no one else may rename or make anything: ``private``
moves it there and back. (ntfs-3g checks
permissions with its ``permissions`` option or a user mapping; without either, every user
allowed on the mount may change anything, and no place is private.) Renaming that
directory itself does not matter: what is done in it goes through its descriptor, which
ntfs-3g's FUSE library follows through a rename."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from deltavault.fs.dirfd import identity

PRIVATE_PREFIX = b".dv-streams-"
NEW_STREAM = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def private(dfd: int, name: bytes, fd: int) -> Iterator[tuple[int, bytes]]:
    """The entry ``name`` of ``dfd`` (open as ``fd``) moved into a fresh directory of ours
    in ``dfd`` for the block, which gets (that directory's fd, the file's name in it); moved
    back and the directory removed after, whatever happens. ESTALE when what stands under
    ``name`` is not the file open as ``fd`` (it was moved back)."""
    pname = PRIVATE_PREFIX + os.urandom(8).hex().encode()
    os.mkdir(pname, 0o700, dir_fd=dfd)
    try:
        pfd = os.open(pname, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except BaseException:
        _rmdir_quiet(dfd, pname)
        raise
    try:
        os.rename(name, name, src_dir_fd=dfd, dst_dir_fd=pfd)
        try:
            if identity(os.stat(name, dir_fd=pfd, follow_symlinks=False)) != identity(os.fstat(fd)):
                raise OSError(errno.ESTALE, "replaced before its streams were written")
            yield pfd, name
        finally:
            os.rename(name, name, src_dir_fd=pfd, dst_dir_fd=dfd)
    finally:
        try:
            if identity(os.stat(pname, dir_fd=dfd, follow_symlinks=False)) == identity(os.fstat(pfd)):
                _rmdir_quiet(dfd, pname)  # (else someone moved it: it is left where they put it)
        except OSError:
            pass
        finally:
            os.close(pfd)


def _rmdir_quiet(dfd: int, name: bytes) -> None:
    try:
        os.rmdir(name, dir_fd=dfd)
    except OSError:
        pass
