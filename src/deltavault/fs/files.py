"""The local cache's directories and files: private to this user whatever the umask.

The cache holds plaintext names (the catalog) and decides what a backup reads again, so
no other user may read or change it. Every directory is made 0700 and every file 0600;
the bits are set with fchmod, so the umask can neither widen nor narrow them.

A directory is used only if, opened with ``O_NOFOLLOW | O_DIRECTORY`` (a symlink in its
place is not followed), ``fstat`` on that fd shows a directory owned by our effective uid
and writable by nobody else. One that others may only read (made by an older version) is
made 0700. Files are then opened relative to that fd with ``O_NOFOLLOW``, and one that is
not a regular file of ours is treated as absent.

The directories above the cache root are the user's and are not checked (a cache below a
directory in which another user may rename entries is no safer than that directory).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from deltavault.fs.dirfd import DIR_FLAGS

DIR_MODE = 0o700
FILE_MODE = 0o600
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a planted FIFO
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeCacheDir(Exception):
    """A cache directory that is not this user's alone; it is not used."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path} {why}")
        self.path = path
        self.why = why


def _check_dir(fd: int, path: Path) -> bool:
    """Refuse a directory that is not ours alone; returns whether it had to be made 0700."""
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise UnsafeCacheDir(path, f"is owned by another user (uid {st.st_uid})")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise UnsafeCacheDir(path, f"is writable by group or others (mode {mode:04o})")
    if mode != DIR_MODE:
        os.fchmod(fd, DIR_MODE)  # readable by others: the names in it are private
        return True
    return False


def _tighten(top: int) -> None:
    """Make everything of ours below the directory ``top`` 0700 or 0600 (a cache an older
    version left readable by others); symlinks and others' entries are left alone."""
    stack = [os.dup(top)]
    while stack:
        fd = stack.pop()
        try:
            names = os.listdir(fd)
        except OSError:
            names = []
        for name in names:
            try:
                sub = os.open(name, _READ_FLAGS, dir_fd=fd)
            except OSError:
                continue  # a symlink (O_NOFOLLOW) or gone
            keep = False
            try:
                st = os.fstat(sub)
                if st.st_uid == os.geteuid() and stat.S_ISDIR(st.st_mode):
                    os.fchmod(sub, DIR_MODE)
                    keep = True
                elif st.st_uid == os.geteuid() and stat.S_ISREG(st.st_mode):
                    os.fchmod(sub, FILE_MODE)
            except OSError:
                pass
            if keep:
                stack.append(sub)
            else:
                os.close(sub)
        os.close(fd)


def _open_dir(name: str | Path, path: Path, dir_fd: int | None = None) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        try:
            link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            raise exc from None
        raise UnsafeCacheDir(path, "is a symbolic link, which deltavault does not follow" if link
                             else "is not a directory") from None


def _create(path: Path) -> int:
    """Make ``path`` and its missing parents 0700, each one made in its parent by fd and
    checked to be ours (another user may have made it first in a shared parent)."""
    missing: list[str] = []
    base = path
    while True:
        missing.append(base.name)
        base = base.parent
        try:
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the user's: followed
            break
        except FileNotFoundError:
            if base == base.parent:
                raise
    here = base
    try:
        for name in reversed(missing):
            here = here / name
            try:
                os.mkdir(name, DIR_MODE, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = _open_dir(name, here, fd)
            os.close(fd)
            fd = nfd
            _check_dir(fd, here)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_dir(path: Path, *, create: bool = True) -> int:
    """An fd of the cache directory ``path``, checked to be ours alone (see the module
    doc); made 0700, with its missing parents, when absent and ``create``. Raises
    UnsafeCacheDir, FileNotFoundError (absent and not ``create``) or another OSError."""
    path = Path(os.path.abspath(path))
    try:
        fd = _open_dir(path, path)
    except FileNotFoundError:
        if not create:
            raise
        return _create(path)
    try:
        _check_dir(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_cache(root: Path, name: str) -> tuple[Path | None, tuple[str, str] | None]:
    """The directory ``root/name`` for one repository's cache, made or checked private, or
    None and (the directory, why it is not used) to report."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return None, (str(root), f"the repository id {name!r} cannot name a cache directory; "
                      "the cache is not used")
    root = Path(os.path.abspath(root))
    path = root / name
    try:
        fd = private_dir(root)
        try:
            try:
                os.mkdir(name, DIR_MODE, dir_fd=fd)
            except FileExistsError:
                pass
            sub = _open_dir(name, path, fd)
            try:
                if _check_dir(sub, path):
                    _tighten(sub)
            finally:
                os.close(sub)
        finally:
            os.close(fd)
    except UnsafeCacheDir as exc:
        return None, (str(exc.path), f"the cache directory {exc.path} {exc.why}: not used in this run, "
                      "since another user could change what deltavault reads from it; remove it (deltavault "
                      "makes a new one) or choose another with --cache-dir or DELTAVAULT_CACHE_DIR")
    except OSError as exc:
        return None, (str(path), f"the cache directory {path} cannot be used "
                      f"({exc.strerror or exc}); this run works without it")
    return path, None


def _write_parts(fd: int, parts: Iterable[bytes | bytearray | memoryview]) -> None:
    """Every part, in order, a few hundred to a system call (writev): a file of 65,536
    small parts (the built index's buckets) is written without joining them first."""
    batch: list[memoryview] = []
    for part in parts:
        view = memoryview(part).cast("B")
        if view:
            batch.append(view)
        if len(batch) == 512:  # under IOV_MAX (1024 on Linux)
            _writev_all(fd, batch)
            batch = []
    if batch:
        _writev_all(fd, batch)


def _writev_all(fd: int, views: list[memoryview]) -> None:
    i = 0
    while i < len(views):
        done = os.writev(fd, views[i:])
        while i < len(views) and done >= len(views[i]):
            done -= len(views[i])
            i += 1
        if done:  # a short write ended inside this part
            views[i] = views[i][done:]


def write_cache_file(path: Path, data: bytes) -> bool:
    """Write a local cache file atomically (temp name, then rename), mode 0600, in a private
    directory made as needed; best effort: a cache only saves downloads, so a failure is
    not an error. Returns whether it was written."""
    return write_cache_parts(path, (data,))


def write_cache_parts(path: Path, parts: Iterable[bytes | bytearray | memoryview]) -> bool:
    """``write_cache_file`` of the concatenation of ``parts``, which is never built."""
    tmp = f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}"
    try:
        dfd = private_dir(path.parent)
    except (OSError, UnsafeCacheDir):
        return False
    try:
        try:
            os.unlink(tmp, dir_fd=dfd)  # left by a killed process with our pid and thread id
        except FileNotFoundError:
            pass
        fd = os.open(tmp, _NEW_FLAGS, FILE_MODE, dir_fd=dfd)
        try:
            os.fchmod(fd, FILE_MODE)  # a umask such as 0o277 narrows the mode given to open
            _write_parts(fd, parts)
        finally:
            os.close(fd)
        os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException as exc:  # Ctrl-C too: a full disk or an interrupt keeps no partial file
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        if not isinstance(exc, OSError):
            raise
        return False
    finally:
        os.close(dfd)
    return True


def open_cache_file(dir_fd: int, name: str) -> int | None:
    """A read fd of the regular file ``name`` of ours in ``dir_fd`` (made 0600 if others may
    read it), or None: absent, a symlink, another type, or another user's."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            return None
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        return None
    return fd


def open_cache_path(path: Path) -> int | None:
    """A read fd of the local cache file ``path`` (as ``open_cache_file`` judges it, in a
    directory that is private), or None."""
    try:
        dfd = private_dir(path.parent, create=False)
    except (OSError, UnsafeCacheDir):
        return None
    try:
        return open_cache_file(dfd, path.name)
    finally:
        os.close(dfd)


def read_cache_file(path: Path) -> bytes | None:
    """The content of a local cache file, or None when it is absent or not to be trusted
    as ours (see ``open_cache_file``) or its directory is not private."""
    fd = open_cache_path(path)
    if fd is None:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except OSError:
        return None


def read_cache_files(folder: Path, names: Iterable[str]) -> dict[str, bytes]:
    """The content of the local cache files ``names`` of the directory ``folder`` that are
    there and ours (as ``read_cache_file`` judges each), by name. The directory is opened
    and checked once for all of them: a listing of 10,000 snapshots reads 10,000 files."""
    out: dict[str, bytes] = {}
    try:
        dfd = private_dir(folder, create=False)
    except (OSError, UnsafeCacheDir):
        return out
    try:
        for name in names:
            fd = open_cache_file(dfd, name)
            if fd is None:
                continue
            try:
                with os.fdopen(fd, "rb") as f:
                    out[name] = f.read()
            except OSError:
                continue
    finally:
        os.close(dfd)
    return out


def remove_cache_files(folder: Path, drop: Callable[[str], bool]) -> None:
    """Remove the files of the cache directory ``folder`` whose names ``drop`` selects."""
    try:
        dfd = private_dir(folder, create=False)
    except (OSError, UnsafeCacheDir):
        return
    try:
        for name in os.listdir(dfd):
            if drop(name):
                try:
                    os.unlink(name, dir_fd=dfd)
                except OSError:
                    pass  # a subdirectory, or gone: nothing to free here
    except OSError:
        pass
    finally:
        os.close(dfd)


def remove_cache_file(path: Path) -> None:
    remove_cache_files(path.parent, lambda name: name == path.name)
