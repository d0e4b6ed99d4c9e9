"""A file a command writes for the user (``dump --target``, ``report --html``): whole or
not at all, and never through a name another user controls.

The directory may be one others write in. So the data goes to a new temporary file beside
FILE (``mkstemp``: ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600), its mode is set through its
fd (a chmod by name followed a symlink swapped in for the temporary file, onto a file
outside), and it is renamed over FILE at the end: a symlink planted under FILE is replaced,
never followed. Afterwards FILE must name the file written; if another user swapped the
temporary name meanwhile, the run fails and says so. A failed run removes its temporary
file and leaves FILE as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from deltavault.errors import DeltavaultError, TargetError, UsageError


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
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.",
                                       suffix=".tmp")
        except OSError as exc:
            raise error(f"cannot write {what} to {path}: {exc.strerror or exc}") from None
        self.tmp = tmp
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def commit(self) -> None:
        try:
            self.file.flush()
            st = os.fstat(self.file.fileno())
            os.fchmod(self.file.fileno(), self.mode)
            self.file.close()
            os.replace(self.tmp, self.path)
            now = os.lstat(self.path)
        except OSError as exc:
            self.abort()
            raise self.error(f"cannot write {self.what} to {self.path}: {exc.strerror or exc}") from None
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise TargetError(f"{self.path} is not the file written: its temporary file was replaced during "
                              "the run (another user writes in that directory)")

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass
