"""DST's root: opened, following no other user's symlink on its path (fs/trusted.py: a
symlink ``/home/alice/mirror -> /etc`` alice made had root's sync write, and with --delete
delete, in /etc), and taken for the run: before anything is written in it, a root that another
user owns, that is not of the owner the run gives it, or that lets group or others further
in than SRC's root will, is made ours alone (0700, no ACLs: fs.meta.take_dir), as a
directory met below it is (``entries.to_take``).
Its owner could otherwise read or move away what the run writes there before the root's
own metadata is set, last, and a default ACL they set would hand them every entry made in
it, for good. Its own metadata is SRC's root's at the end; what the run does not set is
given back then: without --owner its owner and group, and the ACLs of that same owner
(without --acl), so a directory an admin syncs into keeps the owner they gave it. A run
cut short gives it the same (``Receiver.release_root``).

Both ends decide this before the first listing: the local engine from SRC's root, the
agent from the root entry the sender puts in "hello" (sync/wire.py, protocol version 2).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from deltavault.errors import NO_SPACE_ERRNOS, NoSpace, TargetError
from deltavault.fs.dirfd import Identity
from deltavault.fs.meta import ACL_XATTRS, ApplyProblems, read_xattrs, take_dir
from deltavault.fs.paths import display
from deltavault.fs.trusted import UntrustedLink, open_dir_trusted
from deltavault.sync.guard import check_missing_dest
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.receiver.entries import to_take


def open_root(dst: bytes, src: Identity | None, src_name: bytes) -> int:
    """DST's root, opened through our own and root's symlinks only; made, with its missing
    parents, if it is not there (refused first if it would be made inside SRC, the
    directory ``src`` when it is on this kernel: sync/guard.py)."""
    try:
        return _open(dst, create=False)
    except FileNotFoundError:
        check_missing_dest(src, dst, src_name)
    return _open(dst, create=True)


def _open(dst: bytes, *, create: bool) -> int:
    try:
        return open_dir_trusted(dst, create=create)
    except FileNotFoundError as exc:
        if not create:
            raise
        raise TargetError(f"cannot create the destination {display(dst)}: {exc.strerror or exc}") from None
    except UntrustedLink as exc:
        raise TargetError(f"the destination {display(dst)} goes through {display(exc.name)}, a symlink of another "
                          f"user (uid {exc.uid}), who could point it anywhere; name the directory it points "
                          "to") from None
    except NotADirectoryError as exc:
        raise TargetError(f"the destination {display(dst)}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise NoSpace(f"no space to create the destination {display(dst)}") from exc
        raise TargetError(f"cannot open the destination {display(dst)}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class TakenRoot:
    """What DST's root was before the run took it."""

    uid: int
    gid: int
    acls: list[tuple[bytes, bytes]]


def take_root(fd: int, src: os.stat_result, meta: MetaPolicy, dst: bytes) -> TakenRoot | None:
    """Make DST's root (open as ``fd``) ours alone for the run as a directory below it
    would be (``entries.to_take``; ``src``: SRC's root). None: left as it is, or it cannot be changed (a read-only file system, where
    nothing is written either; one without modes, as vfat, whose mount options set them).
    TargetError: another user's root, which we (not root) cannot take: nothing is written
    in it."""
    st = os.fstat(fd)
    if not to_take(st, src, meta):
        return None
    acls = read_xattrs(b"", fd=fd, want=ACL_XATTRS.__contains__)
    try:
        take_dir(fd, st)
    except PermissionError:
        if st.st_uid == os.geteuid():
            return None  # our own, on a file system that keeps no modes
        raise TargetError(f"the destination {display(dst)} belongs to another user (uid {st.st_uid}), who could "
                          "read or move away what is written there while the run writes it; sync into a "
                          "directory of your own (or as root, which takes it for the run)") from None
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return None
        raise TargetError(f"the destination {display(dst)} cannot be made private for the run: "
                          f"{exc.strerror or exc}") from exc
    return TakenRoot(st.st_uid, st.st_gid, acls)


def give_back(fd: int, taken: TakenRoot, src: os.stat_result, meta: MetaPolicy) -> list[str]:
    """Before the root gets SRC's root's metadata: what the run does not set, back as it
    was. Without --owner, its owner and group; its ACLs (without --acl) only if it keeps
    that owner: a root that becomes SRC's owner's keeps none of its former owner's."""
    probs = ApplyProblems([])
    keeps_owner = not meta.chown or src.st_uid == taken.uid
    if not meta.acl and keeps_owner:
        for name, value in taken.acls:
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                probs.add(f"xattr {name.decode(errors='replace')}", exc)
    if not meta.chown and taken.uid != os.geteuid():
        try:
            os.fchown(fd, taken.uid, taken.gid)
        except OSError as exc:
            if exc.errno != errno.EPERM or os.geteuid() == 0:
                probs.add("chown", exc)
    return probs.messages
