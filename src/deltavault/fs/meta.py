"""Capture and apply file metadata: mode, owner, ns times, xattrs (incl. POSIX ACLs).

POSIX ACLs live in the ``system.posix_acl_access`` / ``system.posix_acl_default`` xattrs,
so copying xattrs byte for byte carries them.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from deltavault.fs.dirfd import fd_path
from deltavault.fs.paths import display

ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
CAPABILITY_XATTR = b"security.capability"  # file capabilities: removed by any chown
# One entry's xattr values read together, at most (NTFS streams read as xattrs too): the rest
# are named, not read. Any user may give a file of theirs thousands of 64 KiB xattrs (XFS).
INLINE_MAX = 16 << 20


def exposed(fd: int, st: os.stat_result) -> bool:
    """Whether an existing directory (``st``) may be another user's doing or reach: not ours,
    writable by group or others, or carrying an ACL. One that is none of these (``/etc`` on
    an in-place restore) is left as it is: taking it would shut every other user out of it
    for the whole run, and for good if the run is cut short."""
    return st.st_uid != os.geteuid() or bool(st.st_mode & 0o022) or has_acl(fd)


def has_acl(fd: int) -> bool:
    """Whether the open file or directory ``fd`` carries a POSIX ACL (access or default)."""
    for name in ACL_XATTRS:
        try:
            os.getxattr(fd, name)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                continue
            raise
        return True
    return False


def widens(st: os.stat_result, mode: int, gid: int | None) -> bool:
    """Whether the existing entry ``st`` lets group or others further in than it will once
    its own metadata (``mode``; group ``gid``, None: left as it is) is set, last: a
    permission bit of group or others that ``mode`` lacks, or group bits for another group.
    A directory written in as it is would show what the run puts there (a 0644 file of a
    0700 directory) to users its final mode shuts out, who may open it meanwhile and keep
    it; a file written in place, to whoever opened it before."""
    if st.st_mode & 0o077 & ~mode:
        return True
    return gid is not None and st.st_gid != gid and bool(st.st_mode & 0o070)


def take_dir(fd: int, st: os.stat_result) -> None:
    """An existing directory (``st``) of a tree others may write in, made ours alone before
    anything is written in it, as one we make is: ours (as root; another user's cannot be
    taken otherwise: PermissionError), 0700 and without ACLs. Its owner, had it stayed theirs,
    could read, or move away and keep, what is written there before its own metadata is set,
    last; a default ACL they set would give them every entry made in it, for good."""
    if st.st_uid != os.geteuid():
        try:
            os.fchown(fd, os.geteuid(), -1)
        except PermissionError:
            raise PermissionError(errno.EPERM, f"a directory of another user (uid {st.st_uid}) is in the "
                                  "way; nothing is written in it") from None
    os.fchmod(fd, 0o700)
    for name in ACL_XATTRS:
        try:
            os.removexattr(fd, name)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise


@lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@lru_cache(maxsize=4096)
def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""


def xattr_names(target: int | bytes | str, *, follow: bool = False) -> tuple[list[bytes], bool]:
    """The names of the xattrs of ``target`` (an fd or a path), sorted, and whether they
    fit in what listxattr returns (64 KiB of names, ``XATTR_LIST_MAX``: a file of XFS or
    ext4 with a large block may have more, of its owner's making, which no call lists;
    False: none are known). Unsupported file systems give none."""
    try:
        names = os.listxattr(target, follow_symlinks=follow or isinstance(target, int))
    except OSError as exc:
        if exc.errno in (errno.E2BIG, errno.ERANGE):
            return [], False
        # ENODATA: ntfs-3g (2022.10) fails listxattr so on some files, which have no xattrs there.
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT, errno.EPERM, errno.ENODATA):
            return [], True
        raise
    return sorted(os.fsencode(n) for n in names), True


@dataclass
class XattrRead:
    """One entry's xattrs as read: at most INLINE_MAX of values together."""

    values: list[tuple[bytes, bytes]]  # sorted by name
    over: list[bytes] = field(default_factory=list)  # not read: past INLINE_MAX together
    big: list[bytes] = field(default_factory=list)  # not readable: over 64 KiB (ntfs-3g's streams, E2BIG)
    listed: bool = True  # False: more names than listxattr returns, none read

    def left(self) -> str | None:
        """What was not read, for the run's problems (None: everything was)."""
        parts = [] if self.listed else ["its xattrs have more names than listxattr returns (64 KiB of "
                                        "them): none read"]
        if self.big:
            parts.append(f"{len(self.big)} xattrs (the first: {display(self.big[0])}) over 64 KiB: not read")
        if self.over:
            parts.append(over_message(self.over, "xattrs", "one entry's xattrs"))
        return "; ".join(parts) + "; not kept" if parts else None


def over_message(over: list[bytes], what: str, whose: str) -> str:
    """The problem named when ``over`` (names of ``what``) are past INLINE_MAX."""
    return (f"{len(over)} {what} (the first: {display(over[0])}) not read: {whose} stop at "
            f"{INLINE_MAX >> 20} MiB together")


def read_upto(target: int | bytes | str, names: list[bytes], *, follow: bool = False) -> XattrRead:
    """The values of the xattrs ``names`` of ``target`` (an fd or a path), in that order,
    up to INLINE_MAX together: the names past it are not read (``over``). A file may have
    as many as the names listxattr returns (some 9,000 of ``user.x``), each up to 64 KiB:
    590 MiB. One gone meanwhile is left out; E2BIG (ntfs-3g: a stream over 64 KiB) is
    named (``big``)."""
    got = XattrRead([])
    held = 0
    for n in names:
        if held >= INLINE_MAX:
            got.over.append(n)
            continue
        try:
            value = os.getxattr(target, n, follow_symlinks=follow or isinstance(target, int))
        except OSError as exc:
            if exc.errno == errno.E2BIG:
                got.big.append(n)
            elif exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            continue
        if held + len(value) > INLINE_MAX:
            got.over.append(n)
            held = INLINE_MAX  # (the rest too: what is kept is a prefix in name order)
            continue
        held += len(value)
        got.values.append((n, value))
    return got


def read_bounded(target: int | bytes | str, *, follow: bool = False,
                 want: Callable[[bytes], bool] | None = None) -> XattrRead:
    """The extended attributes of ``target`` (an fd or a path) that ``want`` takes (the
    others are not read), sorted by name, up to INLINE_MAX together (``read_upto``); what
    was not read is in the result (``left``)."""
    names, listed = xattr_names(target, follow=follow)
    # (ntfs-3g's default interface shows named streams as user.* xattrs, and one over
    # 64 KiB fails with E2BIG: a caller that does not want them must not read them)
    got = read_upto(target, [n for n in names if want is None or want(n)], follow=follow)
    got.listed = listed
    return got


def read_xattrs(path: bytes | str, *, follow: bool = False, fd: int | None = None,
                want: Callable[[bytes], bool] | None = None) -> list[tuple[bytes, bytes]]:
    """``read_bounded``'s values, for a caller that names nothing left out (the entry is
    one it made, or only a few named xattrs are wanted)."""
    return read_bounded(fd if fd is not None else path, follow=follow, want=want).values


@dataclass
class ApplyProblems:
    """Metadata that could not be applied; the caller reports it."""

    messages: list[str]

    def add(self, what: str, exc: OSError) -> None:
        self.messages.append(f"{what}: {exc.strerror or exc}")


def _set_xattrs(target: int | bytes, xattrs: list[tuple[bytes, bytes]], problems: ApplyProblems) -> None:
    for name, value in xattrs:
        try:
            os.setxattr(target, name, value)
        except OSError as exc:
            if exc.errno == errno.EPERM and name.startswith(b"trusted."):
                problems.add(f"xattr {name.decode(errors='replace')} (needs CAP_SYS_ADMIN)", exc)
            else:
                problems.add(f"xattr {name.decode(errors='replace')}", exc)


def apply_meta_fd(fd: int, problems: ApplyProblems, *, mode: int | None, uid: int, gid: int,
                  atime_ns: int, mtime_ns: int, xattrs: list[tuple[bytes, bytes]] | None = None,
                  owner: bool = True, drop_xattr: Callable[[bytes], bool] | None = None,
                  handle: bool = False) -> None:
    """Metadata of an open file or directory, in the order that keeps each step:
    xattrs (ACLs), owner (chown clears setuid), file capabilities (chown removes them, even
    as root and to the same owner), mode, times last.

    ``drop_xattr(name)`` says which existing xattrs missing from ``xattrs`` to remove (mirroring).
    ``mode`` None: the file already has it (created with it), or it is a symlink.
    ``handle``: ``fd`` is an ``O_PATH`` handle (fs.dirfd), which the f* calls do not take:
    the same calls go through ``/proc/self/fd/N``, which names that object and no path.
    """
    target: int | bytes = fd_path(fd) if handle else fd
    if xattrs is not None:
        want = dict(xattrs)
        if drop_xattr is not None:
            # only their names are listed (a named stream of ntfs-3g over 64 KiB fails)
            names, listed = xattr_names(fd_path(fd) if handle else fd, follow=handle)
            if not listed:
                problems.messages.append("its xattrs have more names than listxattr returns: "
                                         "those SRC lacks are not removed")
            for name in names:
                if name not in want and drop_xattr(name):
                    try:
                        os.removexattr(target, name)
                    except OSError as exc:
                        problems.add(f"remove xattr {name.decode(errors='replace')}", exc)
        _set_xattrs(target, [(n, v) for n, v in xattrs if n != CAPABILITY_XATTR] if xattrs else xattrs, problems)
    if owner:
        try:
            os.chown(target, uid, gid)
        except PermissionError as exc:
            if os.geteuid() == 0:
                problems.add("chown", exc)
        except OSError as exc:
            problems.add("chown", exc)
    if xattrs:
        _set_xattrs(target, [(n, v) for n, v in xattrs if n == CAPABILITY_XATTR], problems)
    if mode is not None:
        try:
            os.chmod(target, stat.S_IMODE(mode))
        except OSError as exc:
            problems.add("chmod", exc)
    try:
        os.utime(target, ns=(atime_ns, mtime_ns))
    except OSError as exc:
        if not (handle and exc.errno == errno.ENOTSUP):  # some file systems keep no symlink times
            problems.add("utime", exc)
