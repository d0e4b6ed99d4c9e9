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

import os

from deltavault.fs.dirfd import Identity
from deltavault.fs.takeroot import TakenRoot
from deltavault.fs.takeroot import give_back as give_back_root
from deltavault.fs.takeroot import take_root as take_root_as
from deltavault.fs.trusted import open_target_root
from deltavault.sync.guard import check_missing_dest
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.receiver.entries import to_take

_WHAT = "the destination"


def open_root(dst: bytes, src: Identity | None, src_name: bytes) -> int:
    """DST's root, opened through our own and root's symlinks only; made, with its missing
    parents, if it is not there (refused first if it would be made inside SRC, the
    directory ``src`` when it is on this kernel: sync/guard.py)."""
    try:
        return open_target_root(dst, _WHAT, create=False)
    except FileNotFoundError:
        check_missing_dest(src, dst, src_name)
    return open_target_root(dst, _WHAT, create=True)


def take_root(fd: int, src: os.stat_result, meta: MetaPolicy, dst: bytes) -> TakenRoot | None:
    """Make DST's root (open as ``fd``) ours alone for the run as a directory below it
    would be (``entries.to_take``; ``src``: SRC's root). None: left as it is, or it cannot
    be changed (fs.takeroot). TargetError: another user's root, which we (not root) cannot
    take: nothing is written in it."""
    st = os.fstat(fd)
    if not to_take(st, src, meta):
        return None
    return take_root_as(fd, st, _WHAT, dst, "sync into a directory of your own (or as root, which takes it "
                                            "for the run)")


def give_back(fd: int, taken: TakenRoot, src: os.stat_result, meta: MetaPolicy) -> list[str]:
    """Before the root gets SRC's root's metadata: what the run does not set, back as it
    was. Without --owner, its owner and group; its ACLs (without --acl) only if it keeps
    that owner: a root that becomes SRC's owner's keeps none of its former owner's."""
    keeps_owner = not meta.chown or src.st_uid == taken.uid
    return give_back_root(fd, taken, acls=not meta.acl and keeps_owner, owner=not meta.chown)
