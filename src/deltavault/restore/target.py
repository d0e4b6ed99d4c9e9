"""Placing entries in a restore target that other local users may write in while we do.

Every call works in a directory the restorer holds open and names one component, never a
path; nothing is followed (``O_NOFOLLOW``, ``follow_symlinks=False``, ``O_PATH`` handles).
An object gets its metadata through its own fd or handle, after checking it is the one
this run made (fs.dirfd), and only then is it renamed from a temp name to its real one.
So whatever is planted in the target, before or during the run, the restore writes,
chmods, chowns, sets xattrs on and links only objects it created inside the target.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from deltavault.fs.dirfd import (
    DIR_FLAGS,
    Identity,
    Replaced,
    created_handle,
    fd_path,
    handle_at,
    identity,
    link_handle,
    lstat_at,
    open_dir_at,
    rename_checked,
)
from deltavault.fs.meta import ACL_XATTRS, ApplyProblems, apply_meta_fd, exposed, take_dir, widens
from deltavault.model.nodes import Node, NodeType

TEMP_PREFIX = b".dv-restore-"
SETID = stat.S_ISUID | stat.S_ISGID


_random = threading.local()  # random bytes drawn ahead, per thread (temp_name)
# A forked child draws its own: it would otherwise make the parent's next names.
os.register_at_fork(after_in_child=lambda: _random.__dict__.clear())


def temp_name(name: bytes) -> bytes:
    """A temp name for ``name``: 6 random bytes (from the OS, as os.urandom), drawn for 256
    names at a time, which spares a restore a system call per file."""
    buf, at = getattr(_random, "pool", (b"", 0))
    if at + 6 > len(buf):
        buf, at = os.urandom(6 * 256), 0
    _random.pool = (buf, at + 6)
    return TEMP_PREFIX + buf[at:at + 6].hex().encode() + b"-" + name[:120]


@dataclass(frozen=True)
class MetaOptions:
    owner: bool = True  # chown (effective only as root)
    setuid: bool = True  # False (--no-setuid): setuid and setgid bits are cleared on files
    # Metadata set after all the rest (fd, node, fd is an O_PATH handle): NTFS (ntfsmeta.py)
    last: Callable[[int, Node, bool], list[str]] | None = None
    # The target's file system has ACLs it does not list (ntfs-3g with ``acl``): one an
    # entry lacks is removed by name, as listxattr cannot show it inherited
    unlisted_acls: bool = False


def file_mode(node: Node, opts: MetaOptions) -> int:
    """The mode to give a non-directory: setuid/setgid cleared when asked."""
    return node.mode if opts.setuid else node.mode & ~SETID


def final_of(node: Node, opts: MetaOptions) -> tuple[int, int | None]:
    """The mode and group a directory ends with (group None: left as it is), for make_dir."""
    return node.mode, node.gid if opts.owner else None


def apply_node_meta(fd: int, node: Node, opts: MetaOptions, *, handle: bool = False,
                    made: MadeIn | None = None, moded: bool = False) -> list[str]:
    """Metadata of ``node`` onto the object ``fd`` (an open fd, or an ``O_PATH`` handle).
    ``made``: ``fd`` was just created by this run in a directory it made, which gave it that.
    ``moded``: it was created with its final mode and has it (``MadeIn.exact``, checked).
    Returns what could not be applied."""
    probs = ApplyProblems([])
    if node.type == NodeType.SYMLINK:
        mode: int | None = None  # symlinks have no mode of their own
    elif node.type == NodeType.DIR:
        mode = node.mode
    else:
        mode = file_mode(node, opts)
    if moded:
        mode = None  # created so (regular.py)
    owner = opts.owner and (made is None or made.owner != (node.uid, node.gid))
    # An ACL the snapshot's entry lacks was inherited from a default ACL of the directory it
    # was made in, which another user may have planted: it goes (symlinks have none).
    inherited = node.type != NodeType.SYMLINK and (made is None or made.acl)
    if inherited and opts.unlisted_acls:
        _drop_unlisted_acls(fd_path(fd) if handle else fd, node, probs)
    apply_meta_fd(fd, probs, mode=mode, uid=node.uid, gid=node.gid, atime_ns=node.atime,
                  mtime_ns=node.mtime, xattrs=node.xattrs, owner=owner, handle=handle,
                  drop_xattr=ACL_XATTRS.__contains__ if inherited else None)
    if opts.last is not None and node.win is not None:
        probs.messages.extend(opts.last(fd, node, handle))
    return probs.messages


def _drop_unlisted_acls(target: int | bytes, node: Node, probs: ApplyProblems) -> None:
    """The ACLs ``node`` lacks, removed by name: ntfs-3g gives an ACL inherited from a default
    ACL (which another user may have set) but lists none, so the listing never drops it."""
    has = {name for name, _ in node.xattrs}
    for name in ACL_XATTRS:
        if name in has:
            continue
        try:
            os.removexattr(target, name)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                probs.add(f"remove xattr {name.decode()}", exc)


def make_dir(parent: int, name: bytes,
             final: tuple[int, int | None] | None = None) -> tuple[int, os.stat_result, bool]:
    """The directory ``name`` in ``parent``, made 0700 (nobody else may enter it until its
    metadata is set, last) or, when one is already there, that one, made ours and 0700 the
    same way (``fs.meta.take_dir``) when others may have made or reach it, or it lets group
    or others further in than its ``final`` (mode, gid: None for left as it is) will
    (``fs.meta.widens``); anything else in the way is removed first. Returns its fd, its
    fstat and whether this call made it. A directory this call made must still be ours
    when opened: another user cannot make one owned by us, so a swap is ``Replaced``."""
    made = True
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
    except FileExistsError:
        st = lstat_at(parent, name)
        if st is not None and stat.S_ISDIR(st.st_mode):
            made = False
        else:
            os.unlink(name, dir_fd=parent)
            os.mkdir(name, 0o700, dir_fd=parent)
    fd = open_dir_at(parent, name)
    try:
        st = os.fstat(fd)
        if made and st.st_uid != os.geteuid():
            raise Replaced("not the directory just created")
        # others may have planted it, or would see what is written in it: ours alone first
        if not made and (exposed(fd, st) or (final is not None and widens(st, *final))):
            take_dir(fd, st)
    except BaseException:
        os.close(fd)
        raise
    return fd, st, made


@dataclass(frozen=True, slots=True)
class MadeIn:
    """What a file made in a directory this run made (0700, ours: nobody else can change
    its group or ACLs meanwhile) is given by the file system: its owner, None where not
    known for certain, and whether the directory's default ACL gives it an ACL. Metadata
    that is already so is not set again: flistxattr and fchown per file were a twentieth
    of a restore's walk, on its critical path (py-spy, issue #17). ``umask``: the process's,
    None where not known."""

    owner: tuple[int, int] | None
    acl: bool
    umask: int | None = None

    def exact(self, final: int) -> bool:
        """Whether a file created with mode ``final`` comes out with it, and so needs no
        chmod (nobody else can reach the directory to read it meanwhile): not with bits the
        umask clears, nor set-id bits, which chown clears, nor where a default ACL makes
        the mode the ACL's mask, nor without read and write for us (NTFS streams are
        written by name, after the content: a 0444 file would refuse them to a user other
        than root). Otherwise it is created 0600 and chmodded."""
        return (self.umask is not None and not self.acl and final & 0o600 == 0o600 and not final & ~0o777
                and not final & self.umask)


def read_umask() -> int | None:
    """The process's umask, read without setting it (os.umask would change it for every
    thread meanwhile): Linux's /proc/self/status, 4.7 and later. Read once per run (its
    files are created with it), not once per process, whose umask may change between runs."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def made_in(fd: int, st: os.stat_result, umask: int | None) -> MadeIn:
    """``MadeIn`` of the directory ``fd`` (``st``: its fstat), which make_dir just made;
    ``umask``: the run's (``read_umask``)."""
    # A new file's group is the directory's where it is setgid (or the file system is
    # mounted grpid), else ours: where the two agree it is known.
    gid = st.st_gid if st.st_mode & stat.S_ISGID or st.st_gid == os.getegid() else None
    try:
        os.getxattr(fd, ACL_XATTRS[1])
        acl = True
    except OSError as exc:
        acl = exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)  # else: not known, so listed
    return MadeIn(None if gid is None else (st.st_uid, gid), acl, umask)



def install(parent: int, tmp: bytes, name: bytes, want: Identity | None = None) -> None:
    """Give the entry made as ``tmp`` its real name, replacing a non-directory there
    (rename(2) never replaces a directory with a non-directory: EISDIR). ``want``: in a
    directory others may write in, the entry now under ``name`` must be the object made
    (someone may have swapped the temp name), else ``Replaced`` is raised."""
    try:
        if want is None:
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        else:
            rename_checked(parent, tmp, name, want)
    except Replaced:
        raise  # (what stands under either name is not ours: left alone)
    except BaseException as exc:
        unlink_quiet(parent, tmp)
        if isinstance(exc, IsADirectoryError):
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way", name) from None
        raise


def unlink_quiet(parent: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=parent)
    except OSError:
        pass


_SPECIAL_FMT = {NodeType.SYMLINK: stat.S_IFLNK, NodeType.FIFO: stat.S_IFIFO,
                NodeType.CHARDEV: stat.S_IFCHR, NodeType.BLOCKDEV: stat.S_IFBLK}


def place_special(parent: int, node: Node, opts: MetaOptions, *, shared: bool) -> list[str]:
    """A symlink, FIFO or device node: made under a temp name, checked to be what was made,
    given its metadata through an ``O_PATH`` handle (never opened, never followed), then
    renamed into place. ``shared``: others may write in ``parent`` (see ``install``).
    Returns metadata problems."""
    fmt = _SPECIAL_FMT[node.type]
    tmp = temp_name(node.name)
    if node.type == NodeType.SYMLINK:
        os.symlink(node.target, tmp, dir_fd=parent)
    elif node.type == NodeType.FIFO:
        os.mkfifo(tmp, 0o600, dir_fd=parent)
    else:
        os.mknod(tmp, fmt | 0o600, node.rdev, dir_fd=parent)
    try:
        h, st = created_handle(parent, tmp, fmt)
    except BaseException:
        unlink_quiet(parent, tmp)
        raise
    try:
        messages = apply_node_meta(h, node, opts, handle=True)
    except BaseException:
        unlink_quiet(parent, tmp)
        raise
    finally:
        os.close(h)
    install(parent, tmp, node.name, identity(st) if shared else None)
    return messages


def open_handle_below(root: int, relpath: bytes, want: Identity) -> int:
    """An ``O_PATH`` handle to root/relpath, looked up component by component without
    following symlinks, which must be the object ``want``: the first name of a hard link
    group, found again after its handle was let go."""
    parts = [p for p in relpath.split(b"/") if p]
    fd = os.dup(root)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        h, st = handle_at(fd, parts[-1])
    finally:
        os.close(fd)
    if identity(st) != want or not stat.S_ISREG(st.st_mode):
        os.close(h)
        raise Replaced("the first name of this hard link now names another file")
    return h


class LinkSources:
    """The files of this run that more names will be linked to, by the snapshot's
    (dev, inode) key: where each was written and its identity. ``O_PATH`` handles of the
    most recent are kept (at most ``keep``), so a link needs no lookup; an older one is found
    again by path and identity (``open_handle_below``)."""

    def __init__(self, root: int, keep: int = 64) -> None:
        self._root = root
        self._keep = keep
        self._where: dict[tuple[int, int], tuple[bytes, Identity]] = {}
        self._handles: OrderedDict[tuple[int, int], int] = OrderedDict()

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._where

    def reserve(self, key: tuple[int, int]) -> None:
        """The first name of ``key`` is being written (so later names link, not rewrite)."""
        self._where.setdefault(key, (b"", (-1, -1)))

    def add(self, key: tuple[int, int], relpath: bytes, fd: int) -> None:
        """``fd`` is the file just written for ``key`` under ``relpath``."""
        self._where[key] = (relpath, identity(os.fstat(fd)))
        self._remember(key, os.open(fd_path(fd), os.O_PATH | os.O_CLOEXEC))

    def link(self, key: tuple[int, int], parent: int, name: bytes, *, shared: bool) -> None:
        """Make ``name`` in ``parent`` another name of the file written for ``key``."""
        relpath, ident = self._where[key]
        if not relpath:
            raise FileNotFoundError(errno.ENOENT, "its first name could not be restored")
        h = self._handles.pop(key, None)
        if h is None:
            h = open_handle_below(self._root, relpath, ident)
        try:
            tmp = temp_name(name)
            link_handle(h, parent, tmp)
        finally:
            self._remember(key, h)
        install(parent, tmp, name, ident if shared else None)

    def _remember(self, key: tuple[int, int], h: int) -> None:
        old = self._handles.pop(key, None)
        if old is not None:
            os.close(old)
        self._handles[key] = h
        while len(self._handles) > self._keep:
            os.close(self._handles.popitem(last=False)[1])

    def close(self) -> None:
        for h in self._handles.values():
            os.close(h)
        self._handles.clear()
