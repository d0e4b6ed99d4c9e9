"""Working inside a tree that other local users may write in while we do (a restore target,
a sync destination), or that may change under us (a backup source).

The rules, which every writer of such a tree follows:

- A path is never resolved as a string. Each name is one component, looked up in a
  directory we hold open, with ``O_NOFOLLOW``; directories are entered by fd
  (``open_dir_at``), so a symlink swapped in cannot redirect anything.
- An object is changed only through a handle to it: the fd we created it with (regular
  files, ``O_CREAT | O_EXCL``), or an ``O_PATH`` handle opened right after creating it and
  checked to be what we made (``created_handle``). Metadata, xattrs and hard links then go
  through ``/proc/self/fd/N``, which names that inode and no path.
- An object found in place (not made by us) is trusted only if its (st_dev, st_ino) is the
  one we recorded when we made it (``expect_identity``).

``/proc/self/fd/N`` is followed by the kernel as a "magic link" to the open object itself;
for an ``O_PATH`` handle to a symlink that object is the symlink, never its target.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
HANDLE_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

Identity = tuple[int, int]  # (st_dev, st_ino)


class Replaced(OSError):
    """An entry is not the object this run made or recorded: something else was put in its
    place while we worked (another user writing in the tree, or a concurrent change)."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.ESTALE, f"replaced during the run ({what}); left alone")


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino)


def fd_path(fd: int) -> bytes:
    """A path naming the open object ``fd`` itself, for calls that take no fd (xattrs and
    metadata of ``O_PATH`` handles, linkat of a handle)."""
    return b"/proc/self/fd/%d" % fd


def open_dir_at(dir_fd: int, name: bytes) -> int:
    """Open the directory ``name`` in ``dir_fd``; a symlink there fails with ELOOP."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def open_dir_path(root_fd: int, relpath: bytes) -> int:
    """Open root/relpath one component at a time, following no symlink."""
    fd = os.dup(root_fd)
    for part in relpath.split(b"/"):
        if not part:
            continue
        try:
            nfd = open_dir_at(fd, part)
        finally:
            os.close(fd)
        fd = nfd
    return fd


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def handle_at(dir_fd: int, name: bytes) -> tuple[int, os.stat_result]:
    """An ``O_PATH`` handle to the entry ``name`` itself (a symlink is not followed), and its stat."""
    h = os.open(name, HANDLE_FLAGS, dir_fd=dir_fd)
    try:
        return h, os.fstat(h)
    except BaseException:
        os.close(h)
        raise


def created_handle(dir_fd: int, name: bytes, fmt: int,
                   probe: Callable[[], int] | None = None) -> tuple[int, os.stat_result]:
    """The handle of an entry this process has just made under ``name`` (mkfifo, mknod,
    symlink, mkdir), refused with ``Replaced`` unless it has the file type ``fmt``
    (``stat.S_IFIFO``...), the owner our new entries get (``made_by_us``) and, for a
    non-directory, one link. Another user cannot make an object with all three where the
    file system records creators: theirs are owned by them, and a hard link to an object
    outside the tree has two links."""
    h, st = handle_at(dir_fd, name)
    try:
        ok = stat.S_IFMT(st.st_mode) == fmt and (fmt == stat.S_IFDIR or st.st_nlink == 1)
        if not ok or not made_by_us(st, probe):
            raise Replaced("not the entry just created")
    except BaseException:
        os.close(h)
        raise
    return h, st


def made_by_us(st: os.stat_result, probe: Callable[[], int] | None) -> bool:
    """Is ``st``'s owner the one an entry we make gets? Our effective uid, unless the file
    system gives new entries another owner (NFS with root squash, an ntfs-3g mount with
    ``uid=``): then ``probe`` (see ``new_entry_owner``) tells which, and only when asked."""
    if st.st_uid == os.geteuid():
        return True
    if probe is None:
        return False
    try:
        return st.st_uid == probe()
    except Replaced:
        raise
    except OSError as exc:
        # Not known to be ours (another user may have filled the file system to make the
        # probe fail): refused as a swap, so that the caller leaves it alone, never removes it.
        raise Replaced(f"owner {st.st_uid} is not ours, and the owner our entries get here is "
                       f"unknown: {exc.strerror or exc}") from exc


def new_entry_owner(dir_fd: int, name: bytes) -> int:
    """The owner the file system gives an entry we make in ``dir_fd``: that of a regular
    file made as ``name`` (a free temp name), read through the fd it was made with, which
    no other user can swap. The file is removed again if ``name`` still names it (else
    ``Replaced``: what stands there is left alone)."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    now = lstat_at(dir_fd, name)
    if now is None or identity(now) != identity(st):
        raise Replaced("the owner probe was swapped for another entry")
    os.unlink(name, dir_fd=dir_fd)
    return st.st_uid


def expect_identity(dir_fd: int, name: bytes, want: Identity) -> tuple[int, os.stat_result]:
    """A handle to ``name``, which must be the object recorded as ``want``."""
    h, st = handle_at(dir_fd, name)
    if identity(st) != want:
        os.close(h)
        raise Replaced("another file stands under this name")
    return h, st


def rename_checked(dir_fd: int, tmp: bytes, name: bytes, want: Identity) -> None:
    """Rename the entry this run made as ``tmp`` (``want``: its identity, from the fd or
    handle it was made through) to ``name``, in a directory others may write in. They may
    have swapped ``tmp`` for an entry of theirs since it was written: it must be ``want``
    right before the rename (else nothing is renamed), and ``name`` right after (a swap
    between the two). Either way ``Replaced``, and what they put there is left alone."""
    st = lstat_at(dir_fd, tmp)
    if st is None or identity(st) != want:
        raise Replaced("swapped for another entry before it was put in place")
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    st = lstat_at(dir_fd, name)
    if st is None or identity(st) != want:
        raise Replaced("swapped for another entry while it was put in place")


def link_handle(handle: int, dst_dir_fd: int, name: bytes) -> None:
    """Make ``name`` in ``dst_dir_fd`` another name of the object ``handle`` is open on
    (linkat through the handle: no path to the first name is resolved)."""
    os.link(fd_path(handle), name, dst_dir_fd=dst_dir_fd, follow_symlinks=True)


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` lies on (a bind mount has its own, unlike st_dev)."""
    with open(b"/proc/self/fdinfo/%d" % fd, "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "no mnt_id in /proc/self/fdinfo")


def ancestors(dir_fd: int) -> list[Identity]:
    """Identities of the directory ``dir_fd`` and of each directory above it, up to the
    root, found through ``..`` (so through the mounts it is really reached by)."""
    out: list[Identity] = []
    fd = os.dup(dir_fd)
    try:
        while True:
            ident = identity(os.fstat(fd))
            if out and out[-1] == ident:
                return out  # ".." of "/" is "/"
            out.append(ident)
            nfd = os.open(b"..", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def raise_nofile_limit() -> int:
    """Raise the soft limit of open files to the hard limit, for walks that hold one
    directory fd per level of a deep tree. Returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft if soft != resource.RLIM_INFINITY else want
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft
    return want


# ---------------------------------------------------------------------------- added for sync

def created_dir(dir_fd: int, name: bytes, probe: Callable[[], int] | None = None) -> tuple[int, os.stat_result]:
    """Open the directory ``name`` that this process has just made (mkdir): refused with
    ``Replaced`` unless it is a directory with the owner our new entries get
    (``made_by_us``), which another user cannot make where the file system records
    creators (a directory of theirs swapped in between the mkdir and this open)."""
    fd = open_dir_at(dir_fd, name)
    try:
        st = os.fstat(fd)
        if not made_by_us(st, probe):
            raise Replaced("not the directory just created")
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def open_dir_checked(dir_fd: int, name: bytes, want: Identity) -> int:
    """Open the directory ``name`` (no symlink followed), which must be ``want``."""
    fd = open_dir_at(dir_fd, name)
    try:
        if identity(os.fstat(fd)) != want:
            raise Replaced("another directory stands under this name")
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_parent_checked(child_fd: int, want: Identity) -> int | None:
    """The directory above ``child_fd`` (through ".."), if it is still ``want``; None when
    the child was moved elsewhere meanwhile."""
    try:
        fd = os.open(b"..", DIR_FLAGS, dir_fd=child_fd)
    except OSError:
        return None
    if identity(os.fstat(fd)) == want:
        return fd
    os.close(fd)
    return None


class NotRegular(OSError):
    """What stands under a file's name is no longer a regular file (a FIFO, a device or a
    symlink was swapped in): it is not opened."""

    def __init__(self) -> None:
        super().__init__(errno.EINVAL, "no longer a regular file when opened; not read")


O_NOATIME = getattr(os, "O_NOATIME", 0)


def open_regular(dir_fd: int, name: bytes) -> int:
    """Open the regular file ``name`` of ``dir_fd`` for reading, through an ``O_PATH`` handle
    checked to be a regular file first: opening whatever was swapped in under the name could
    block (a FIFO) or act (a device: a tape rewinds, a watchdog arms). No symlink is followed;
    the atime is left alone where we may (``O_NOATIME`` needs ownership). Raises NotRegular."""
    h, st = handle_at(dir_fd, name)
    try:
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular()
        try:
            return reopen(h, os.O_RDONLY | O_NOATIME)
        except PermissionError:
            if not O_NOATIME:
                raise
            return reopen(h, os.O_RDONLY)
    finally:
        os.close(h)


def reopen(handle: int, flags: int) -> int:
    """Open the object an ``O_PATH`` handle names, for reading or writing: the same inode,
    whatever now stands under its name."""
    return os.open(fd_path(handle), flags | os.O_CLOEXEC)
