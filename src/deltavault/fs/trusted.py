"""Opening a directory a user names (a sync's DST) so that no other user can steer it
elsewhere: the path is walked one name at a time from ``/`` (or the working directory),
each opened with ``O_NOFOLLOW`` from the one before, and a symlink on the way is followed
only if it is ours or root's, as the kernel's ``protected_symlinks`` does in sticky
directories. Another user's symlink (``/home/alice/mirror -> /etc``, made by alice before
root's sync with --delete) is refused: ``UntrustedLink``. The link is read through an
``O_PATH`` handle of it (``readlinkat(fd, "")``), so the link judged is the link read.

With ``create``, a missing directory is made (mode 0777 less the umask, as ``mkdir -p``)
and walked into the same way: one swapped in for it meanwhile is judged like any other.

``open_target_root`` is that walk for the root a command writes under (a sync's DST, a
restore's target, the directory of a volume restore's image), its failures the target's
(exit 17) with a message that names it.
"""

from __future__ import annotations

import errno
import os
import stat

from deltavault.errors import NO_SPACE_ERRNOS, NoSpace, TargetError
from deltavault.fs.paths import display

MAX_LINKS = 40  # as the kernel's MAXSYMLINKS
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class UntrustedLink(OSError):
    """A symlink of another user on the way: ``uid`` owns it, ``name`` is its name."""

    def __init__(self, uid: int, name: bytes) -> None:
        super().__init__(errno.EPERM, f"a symlink of another user (uid {uid})")
        self.uid, self.name = uid, name


def open_dir_trusted(path: bytes, *, create: bool = False) -> int:
    """The directory ``path``, opened following only our own and root's symlinks (see the
    module). OSError as ``open(2)`` or ``mkdir(2)`` gives it (FileNotFoundError, ...),
    NotADirectoryError saying whether it is ``path`` or a parent, or UntrustedLink."""
    fd = os.open(b"/" if path.startswith(b"/") else b".", _DIR)
    todo = _names(path)
    links = 0
    try:
        while todo:
            name = todo.pop()
            try:
                nfd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass  # made meanwhile: opened and judged as it is
                todo.append(name)
                continue
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                try:
                    target = _trusted_link(fd, name)
                except NotADirectoryError:
                    raise NotADirectoryError(errno.ENOTDIR, "a parent is not a directory" if todo
                                             else "exists and is not a directory") from None
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links") from None
                todo.extend(_names(target))
                if target.startswith(b"/"):
                    os.close(fd)
                    fd = -1
                    fd = os.open(b"/", _DIR)
                continue
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def open_target_root(path: bytes, what: str, *, create: bool) -> int:
    """``open_dir_trusted``, its failures TargetError (NoSpace when the disk is full) saying
    ``what`` ("the destination", "the restore target") ``path`` is."""
    try:
        return open_dir_trusted(path, create=create)
    except FileNotFoundError as exc:
        if not create:
            raise
        raise TargetError(f"cannot create {what} {display(path)}: {exc.strerror or exc}") from None
    except UntrustedLink as exc:
        raise TargetError(f"{what} {display(path)} goes through {display(exc.name)}, a symlink of another "
                          f"user (uid {exc.uid}), who could point it anywhere; name the directory it points "
                          "to") from None
    except NotADirectoryError as exc:
        raise TargetError(f"{what} {display(path)}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise NoSpace(f"no space to create {what} {display(path)}") from exc
        raise TargetError(f"cannot open {what} {display(path)}: {exc.strerror or exc}") from exc


def _names(path: bytes) -> list[bytes]:
    """The names of ``path`` as a stack: the next one last."""
    return [p for p in path.split(b"/") if p and p != b"."][::-1]


def _trusted_link(dir_fd: int, name: bytes) -> bytes:
    """The target of the symlink ``name`` if we or root own it (UntrustedLink if another
    user does; NotADirectoryError if it is no symlink)."""
    h = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(h)
        if not stat.S_ISLNK(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        if st.st_uid not in (0, os.geteuid()):
            raise UntrustedLink(st.st_uid, name)
        return os.fsencode(os.readlink(b"", dir_fd=h))
    finally:
        os.close(h)
