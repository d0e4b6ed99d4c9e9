"""The root a command writes under (a sync's DST, a restore's target), taken for the run
when others own or reach it, and what it was given back at the end.

Taken: made ours alone (0700, no ACLs: fs.meta.take_dir) before anything is written in
it, as a directory met below it is. Its owner, had it stayed theirs, could read or move
away what the run writes there, or give it a default ACL that every entry made in it
inherits. Which roots are taken, and what they end with, is each command's rule
(sync/receiver/root.py, restore/root.py); what it was before is kept here (``TakenRoot``)
and given back (``give_back``).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from deltavault.errors import TargetError
from deltavault.fs.meta import ACL_XATTRS, ApplyProblems, read_xattrs, take_dir
from deltavault.fs.paths import display


@dataclass(frozen=True)
class TakenRoot:
    """What the root was before the run took it."""

    uid: int
    gid: int
    mode: int
    acls: list[tuple[bytes, bytes]]


def take_root(fd: int, st: os.stat_result, what: str, path: bytes, advice: str) -> TakenRoot | None:
    """Make the root (open as ``fd``, ``st`` its stat) ours alone for the run. None: it
    cannot be changed (a read-only file system, where nothing is written either; one
    without modes, as vfat, whose mount options set them). TargetError: another user's
    root, which we (not root) cannot take: nothing is written in it (``what`` ``path``
    names it, ``advice`` says what to do instead)."""
    acls = read_xattrs(b"", fd=fd, want=ACL_XATTRS.__contains__)
    try:
        take_dir(fd, st)
    except PermissionError:
        if st.st_uid == os.geteuid():
            return None  # our own, on a file system that keeps no modes
        raise TargetError(f"{what} {display(path)} belongs to another user (uid {st.st_uid}), who could "
                          f"read or move away what is written there while the run writes it; {advice}") from None
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return None
        raise TargetError(f"{what} {display(path)} cannot be made private for the run: "
                          f"{exc.strerror or exc}") from exc
    return TakenRoot(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), acls)


def give_back(fd: int, taken: TakenRoot, *, acls: bool, owner: bool, mode: bool = False) -> list[str]:
    """What the root was before the run took it, back: its ACLs (``acls``), its owner and
    group (``owner``: when another user's), its mode (``mode``), in that order as sync has
    it (a mode set after the ACLs sets their mask). Returns what could not be given back."""
    probs = ApplyProblems([])
    if acls:
        for name, value in taken.acls:
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                probs.add(f"xattr {name.decode(errors='replace')}", exc)
    if owner and taken.uid != os.geteuid():
        try:
            os.fchown(fd, taken.uid, taken.gid)
        except OSError as exc:
            if exc.errno != errno.EPERM or os.geteuid() == 0:
                probs.add("chown", exc)
    if mode:
        try:
            os.fchmod(fd, taken.mode)
        except OSError as exc:
            probs.add("chmod", exc)
    return probs.messages
