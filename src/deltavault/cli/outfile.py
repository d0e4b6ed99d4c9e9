"""A file a command writes for the user (``dump --target``, ``report --html``): whole or
not at all, and never through a name another user controls.

The directory is reached following no other user's symlink (fs/trusted.py: one alice made,
``/home/alice/out -> /root``, had root's dump replace a file of FILE's name in /root), then
held open, and every step is made in it by fd. It may be one others write in. So the data
goes to a new temporary file beside FILE (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600), its mode is set through its
fd (a chmod by name followed a symlink swapped in for the temporary file, onto a file
outside), and it is renamed over FILE at the end: a symlink planted under FILE is replaced,
never followed. Afterwards FILE must name the file written; if another user swapped the
temporary name meanwhile, the run fails and says so. A failed run removes its temporary
file and leaves FILE as it was.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from deltavault.errors import NO_SPACE_ERRNOS, DeltavaultError, NoSpace, TargetError, UsageError
from deltavault.fs.trusted import open_target_root

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputFile:
    """Opened before any work, so an unwritable FILE fails at once. ``mode``: the file's
    final mode (the umask applies unless ``exact``); ``error``: what a FILE that cannot be
    written raises (each command keeps its exit code)."""

    def __init__(self, path: Path, what: str, mode: int = 0o644, *, exact: bool = False,
                 error: type[DeltavaultError] = TargetError) -> None:
        self.path, self.what, self.error = path, what, error
        self.mode = mode if exact else mode & ~_umask()
        if path.is_dir():
            raise UsageError(f"cannot write {what} to {path}: it is a directory")
        self.name = os.fsencode(path.name)
        try:
            self.dir = open_target_root(os.fsencode(path.parent), f"the directory of {what}", create=False)
        except TargetError as exc:
            raise error(str(exc)) from None
        except OSError as exc:
            raise error(f"cannot write {what} to {path}: {exc.strerror or exc}") from None
        try:
            self.tmp, fd = self._new_temp()
        except OSError as exc:
            os.close(self.dir)
            raise error(f"cannot write {what} to {path}: {exc.strerror or exc}") from None
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def _new_temp(self) -> tuple[bytes, int]:
        """A new file beside FILE, of a random name (``.FILE.RANDOM.tmp``, as mkstemp)."""
        for _ in range(100):
            tmp = b".%s.%s.tmp" % (self.name, secrets.token_hex(6).encode())
            try:
                return tmp, os.open(tmp, _NEW, 0o600, dir_fd=self.dir)
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free temporary name")

    def commit(self) -> None:
        try:
            self.file.flush()
            st = os.fstat(self.file.fileno())
            os.fchmod(self.file.fileno(), self.mode)
            self.file.close()
            os.rename(self.tmp, self.name, src_dir_fd=self.dir, dst_dir_fd=self.dir)
            now = os.stat(self.name, dir_fd=self.dir, follow_symlinks=False)
        except OSError as exc:
            self.abort()
            raise self._full(exc) or self.error(
                f"cannot write {self.what} to {self.path}: {exc.strerror or exc}") from None
        os.close(self.dir)
        self.dir = -1
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise TargetError(f"{self.path} is not the file written: its temporary file was replaced during "
                              "the run (another user writes in that directory)")

    @contextmanager
    def writing(self) -> Iterator[BinaryIO]:
        """The file to write; FILE is put in place when the block ends, and on any error the
        temporary file is removed. A full file system is NoSpace (exit 14), naming FILE:
        ``dump --target`` and ``report --html`` onto a full disk ended with a traceback."""
        try:
            yield self.file
        except BaseException as exc:
            self.abort()
            if (full := self._full(exc)) is not None:
                raise full from None
            raise
        self.commit()

    def _full(self, exc: BaseException) -> NoSpace | None:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return NoSpace(f"cannot write {self.what} to {self.path}: {exc.strerror}")
        return None

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        if self.dir < 0:
            return
        try:
            os.unlink(self.tmp, dir_fd=self.dir)
        except OSError:
            pass
        os.close(self.dir)
        self.dir = -1
