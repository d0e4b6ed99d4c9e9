"""The directory of a volume restore's target (an image file, or a block device), which
other users may write in: held open, and every step made in it by fd.

What stands under the target's name is examined without following it. A block device is
written through a handle to that very node. A symlink is followed only in a directory
nobody else may write in (``trusted``): ``/dev/disk/by-id/...`` is, but one another user
planted in a shared directory, to a block device, is refused: written through, it had the
volume written over that device. A symlink that leads elsewhere is replaced by the image
file, as a regular file is. The image is written under a random temporary name made with
``O_EXCL | O_NOFOLLOW`` and renamed over the target, which must then be the file written.
The directory itself is reached following no other user's symlink (fs/trusted.py): one
alice made on the way (``/home/alice/img -> /etc``) had root write the image there.
"""

from __future__ import annotations

import contextlib
import os
import stat
from types import TracebackType

from deltavault.errors import TargetError, UsageError
from deltavault.fs.dirfd import Replaced, handle_at, identity, lstat_at, rename_checked
from deltavault.fs.meta import has_acl
from deltavault.fs.paths import display
from deltavault.fs.trusted import open_target_root

NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def trusted(dir_fd: int) -> bool:
    """Whether nobody but root and us may add, remove or rename entries of the directory
    ``dir_fd``: its owner is one of them, and neither group, others nor an ACL may write."""
    st = os.fstat(dir_fd)
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022 and not has_acl(dir_fd)


class TargetDir:
    """The target's directory, open (a context manager), and the target's name in it."""

    def __init__(self, target: str) -> None:
        self.target = target
        parent, name = os.path.split(os.path.abspath(target))
        self._parent, self.name = parent, os.fsencode(name)
        self.fd = -1

    def __enter__(self) -> TargetDir:
        if not self.name:
            raise UsageError(f"{display(os.fsencode(self.target))} names no file")
        try:
            self.fd = open_target_root(os.fsencode(self._parent), "the directory of the restore target",
                                       create=False)
        except FileNotFoundError as exc:
            raise TargetError(f"the directory of the restore target {display(os.fsencode(self.target))}: "
                              f"{exc.strerror or exc}") from exc
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None,
                 _tb: TracebackType | None) -> None:
        os.close(self.fd)

    def lstat(self) -> os.stat_result | None:
        """What stands under the target's name, not followed."""
        return lstat_at(self.fd, self.name)

    def examine(self) -> tuple[os.stat_result | None, int | None]:
        """What stands under the target's name (``lstat``) and, when that is a block device,
        an ``O_PATH`` handle to it (``device``)."""
        try:
            st = self.lstat()
            return st, self.device(st)
        except OSError as exc:
            raise TargetError(f"restore target {self.target}: {exc.strerror or exc}") from exc

    def device(self, st: os.stat_result | None) -> int | None:
        """An ``O_PATH`` handle to the block device the target is (``st``: as lstat met it),
        or None when it is none (nothing, a regular file, a symlink leading elsewhere)."""
        if st is None:
            return None
        if stat.S_ISBLK(st.st_mode):
            h, hst = handle_at(self.fd, self.name)
            if identity(hst) != identity(st):
                os.close(h)
                raise Replaced("another entry stands under the target's name")
            return h
        if not stat.S_ISLNK(st.st_mode):
            return None
        try:
            h = os.open(self.name, os.O_PATH | os.O_CLOEXEC, dir_fd=self.fd)  # followed
        except OSError:
            return None  # leads nowhere: replaced as a file would be
        if not stat.S_ISBLK(os.fstat(h).st_mode):
            os.close(h)
            return None
        if not trusted(self.fd):
            os.close(h)
            raise UsageError(f"{display(os.fsencode(self.target))} is a symlink to a block device in a "
                             "directory others may write in: not followed (name the device itself)")
        return h

    def install(self, tmp: bytes, fd: int) -> None:
        """Rename ``tmp`` (the file open as ``fd``) over the target; it must then stand
        there (in a directory others may write in, the temporary name may be swapped)."""
        rename_checked(self.fd, tmp, self.name, identity(os.fstat(fd)))
        os.fsync(self.fd)

    def unlink(self, name: bytes) -> None:
        """Remove ``name`` from the directory, if it can be (a failed run's temporary file:
        never raises in place of the run's own error)."""
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=self.fd)
