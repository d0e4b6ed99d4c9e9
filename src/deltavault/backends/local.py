"""Local directory backend: the embedded default."""

from __future__ import annotations

import atexit
import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from deltavault.backends.base import TEMP_PREFIX, ObjectInfo, check_object_name, temp_name
from deltavault.backends.limits import check_size, read_bounded, whole_limit
from deltavault.errors import NO_SPACE_ERRNOS, AccessRefused, BackendError, NoSpace, ObjectNotFound

COPY_PIECE = 1024 * 1024  # put_file without copy_file_range copies this much at a time
EXIT_WAIT = 30.0  # seconds the exit waits for puts in flight before removing their temp files


class _Writes:
    """Temp files being written right now, by any LocalBackend of this process. A put on a
    daemon thread (the pack uploader) outlives Ctrl-C or SIGTERM until the process exits, and
    may even start after the exit handler looked (its open still under way): so at exit new
    puts are refused, and those in flight are waited for (each removes its own temp file)
    before whatever is left is removed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._paths: set[str] = set()
        self.closing = False

    def begin(self, path: str) -> None:
        with self._cond:
            if self.closing:
                raise BackendError("the process is exiting: no new write started", retryable=False)
            self._paths.add(path)

    def end(self, path: str) -> None:
        with self._cond:
            self._paths.discard(path)
            self._cond.notify_all()

    def close(self, wait: float = EXIT_WAIT) -> None:
        with self._cond:
            self.closing = True
            self._cond.wait_for(lambda: not self._paths, timeout=wait)
            left = list(self._paths)
        for path in left:
            try:
                os.unlink(path)
            except OSError:
                pass


_writes = _Writes()
atexit.register(_writes.close)


def _raise_for(exc: OSError, what: str, op: str) -> None:
    """The typed error for ``exc``, met when ``op`` (read, write, list...) of ``what``."""
    if exc.errno in NO_SPACE_ERRNOS:
        raise NoSpace(f"no space left on the repository disk while writing {what}") from exc
    if exc.errno == errno.ENOENT:
        raise ObjectNotFound(f"{what}: not found") from exc
    if exc.errno in (errno.EACCES, errno.EPERM):  # this user may not: as a refused login, exit 19
        where = os.fsdecode(exc.filename) if exc.filename is not None else what
        if os.path.basename(where).startswith(TEMP_PREFIX):  # a put's temp file: name its folder
            where = os.path.dirname(where)
        # strerror too: EPERM is also an immutable or append-only file (chattr +i, +a), even for root
        raise AccessRefused(f"permission denied to {op} {what}" + (f" ({where})" if where != what else "")
                            + f": {exc.strerror or exc}") from exc
    raise BackendError(f"{what}: {exc.strerror or exc}", retryable=False) from exc


def _open_regular(path: Path, name: str) -> tuple[int, os.stat_result]:
    """Open an object for reading, refusing anything but a regular file: a FIFO planted in
    a repository that another user can write in would block ``open`` for ever, and a device
    would answer without end. O_NONBLOCK makes the open of a FIFO return at once; it changes
    nothing for a regular file. Returns the fd and its ``fstat`` (a whole read's size)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BackendError(f"{name}: not a regular file (mode {stat.filemode(st.st_mode)}): "
                               "refused unread (a hostile or broken store)", retryable=False)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class LocalBackend:
    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self._fsync = fsync
        self._made_dirs: set[Path] = set()

    def location(self) -> str:
        return str(self.root)

    def exists(self) -> bool:
        return self.root.is_dir()

    def _path(self, name: str) -> Path:
        check_object_name(name)
        return self.root / name

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return
        # Each directory with its name in the repository ("" for the root), so that an
        # entry's name is a join, not a relpath per entry (10,000 snapshots list in 0.3 s
        # with relpath and pathlib, a third of that now).
        stack = [(str(base), os.path.relpath(base, self.root).replace(os.sep, "/"))]
        while stack:
            d, rel = stack.pop()
            head = "" if rel == "." else rel + "/"
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue
            except OSError as exc:
                _raise_for(exc, d, "list")
            for e in entries:
                if e.name.startswith(TEMP_PREFIX):
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, head + e.name))
                else:
                    try:
                        size = e.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
                    yield ObjectInfo(head + e.name, size)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        if length is not None and offset >= 0:
            return self._pread(path, name, offset, length)
        try:
            fd, st = _open_regular(path, name)
            with os.fdopen(fd, "rb", buffering=0) as f:
                if offset < 0:
                    f.seek(offset, os.SEEK_END)
                elif offset:
                    f.seek(offset)
                if length is None and offset < 0:
                    length = -offset  # the tail
                if length is None:  # whole, or from offset to the end: bounded by its kind
                    most, size = whole_limit(name), st.st_size
                    check_size(name, size - offset, most)
                    return read_bounded(f.read, name, most, size - offset)
                out = bytearray()
                while len(out) < length:
                    piece = f.read(length - len(out))
                    if not piece:
                        break
                    out += piece
                return bytes(out)
        except OSError as exc:
            if exc.errno == errno.EINVAL and offset < 0:
                raise ObjectNotFound(f"{name}: shorter than {-offset} bytes") from exc
            _raise_for(exc, name, "read")
            raise  # unreachable: _raise_for always raises

    @staticmethod
    def _pread(path: Path, name: str, offset: int, length: int) -> bytes:
        """A range read straight into its bytes object: the kernel copies with the GIL
        released, where growing a bytearray and copying it out held the GIL for two copies
        of every byte a restore reads (a profile of the files restore showed them)."""
        try:
            fd, _st = _open_regular(path, name)
            try:
                data = os.pread(fd, length, offset)
                if 0 < len(data) < length:  # a short read: gather the rest (rare on a local file)
                    parts = [data]
                    got = len(data)
                    while got < length:
                        piece = os.pread(fd, length - got, offset + got)
                        if not piece:
                            break
                        parts.append(piece)
                        got += len(piece)
                    data = b"".join(parts)
                return data
            finally:
                os.close(fd)
        except OSError as exc:
            _raise_for(exc, name, "read")
            raise  # unreachable: _raise_for always raises

    def put(self, name: str, data: bytes) -> None:
        def write(fd: int) -> None:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        self._put_with(name, write)

    def put_file(self, name: str, src: int, size: int) -> None:
        """``put`` of the first ``size`` bytes of the open file ``src``, copied by the kernel
        (copy_file_range), never through this process's memory (the backup's spooled packs)."""
        def write(fd: int) -> None:
            pos = 0
            while pos < size:
                try:
                    n = os.copy_file_range(src, fd, size - pos, pos)
                except OSError as exc:
                    # EPERM: a seccomp filter (container runtimes, systemd) refusing the call; the
                    # target is our own new temp file, so it is not a permission problem.
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                        raise
                    n = os.write(fd, os.pread(src, min(COPY_PIECE, size - pos), pos))
                if n <= 0:
                    raise OSError(errno.EIO, f"source file shorter than {size} bytes")
                pos += n
        self._put_with(name, write)

    def _put_with(self, name: str, write: Callable[[int], None]) -> None:
        path = self._path(name)
        parent = path.parent
        if parent not in self._made_dirs:
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                _raise_for(exc, name, "write")
            self._made_dirs.add(parent)
        tmp = parent / temp_name(path.name)
        _writes.begin(str(tmp))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write(fd)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if _writes.closing:  # written, but the process is exiting: abandoned, not stored
                raise InterruptedError(errno.EINTR, "the process is exiting")
            os.replace(tmp, path)
            if self._fsync:
                dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except BaseException as exc:
            # Ctrl-C or SIGTERM lands as KeyboardInterrupt in whichever put the main thread is
            # in: its temp file goes too, not only on an OSError.
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, OSError):
                _raise_for(exc, name, "write")
            raise
        finally:
            _writes.end(str(tmp))

    def remove_temp_files(self, older_than: float, *, dry_run: bool = False) -> tuple[int, int]:
        """Remove the temporary files of writes that never finished (a killed process), if
        untouched for ``older_than`` seconds. Returns (files, bytes). A writer that is only
        stalled loses its put (the rename fails and it reports an error); nothing stored
        references a temporary file."""
        cutoff = time.time() - older_than
        files = size = 0
        for dirpath, _dirs, names in os.walk(self.root):
            for n in names:
                if not n.startswith(TEMP_PREFIX):
                    continue
                path = os.path.join(dirpath, n)
                try:
                    st = os.stat(path, follow_symlinks=False)
                    if st.st_mtime >= cutoff:
                        continue
                    if not dry_run:
                        os.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    _raise_for(exc, path, "remove")
                files += 1
                size += st.st_size
        return files, size

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            return
        except OSError as exc:
            _raise_for(exc, name, "delete")

    def stat(self, name: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(name))
        except OSError as exc:
            _raise_for(exc, name, "stat")
            raise
        return ObjectInfo(name, st.st_size)
