"""Overlap by identity: SRC and DST must be separate trees, judged by (st_dev, st_ino) of
directories, never by path strings (a bind mount shows one directory under two names).

Before a run, ``Guard.check`` refuses a DST that is SRC, lies inside it or contains it,
using each root's ``lineage`` (every directory above it, through mount points and through
the real parents of bind-mounted directories); ``check_missing_dest`` does the same for a
DST not made yet. During a run, the walks meet mount roots inside the trees;
``Guard.overlap`` says which of them show SRC, DST or a directory above either, so that
nothing is copied into itself and ``--delete`` never reaches into SRC (removal never
crosses a mount at all: receiver/remove.py). A sync between hosts on the same kernel (ssh to
localhost) compares identities too: each end describes its tree in "hello".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from deltavault.errors import UsageError
from deltavault.fs.dirfd import Identity, identity, mount_id
from deltavault.fs.mounts import lineage
from deltavault.fs.paths import display


@dataclass
class Guard:
    """The identities of SRC and DST and of every directory above each. Either may be None
    when that tree is on another host (then nothing on this host can overlap it)."""

    src: Identity | None
    src_lineage: frozenset[Identity]
    dst: Identity | None
    dst_lineage: frozenset[Identity]

    @classmethod
    def local(cls, src_fd: int, dst_fd: int) -> Guard:
        return cls(identity(os.fstat(src_fd)), frozenset(lineage(src_fd)),
                   identity(os.fstat(dst_fd)), frozenset(lineage(dst_fd)))

    @classmethod
    def one_side(cls, fd: int, *, is_src: bool, peer: Any = None) -> Guard:
        """A sync between hosts: our tree, and the other end's as it described it with
        ``describe`` (used only if that end runs on this same kernel)."""
        ours, ours_l = identity(os.fstat(fd)), frozenset(lineage(fd))
        theirs, theirs_l = _peer(peer)
        if is_src:
            return cls(ours, ours_l, theirs, theirs_l)
        return cls(theirs, theirs_l, ours, ours_l)

    def describe(self, *, is_src: bool) -> dict[str, Any]:
        """Our tree, for the other end of a sync between hosts."""
        root, above = (self.src, self.src_lineage) if is_src else (self.dst, self.dst_lineage)
        return {"boot": boot_id(), "root": list(root) if root else None, "lineage": [list(i) for i in above]}

    @staticmethod
    def peer_root(peer: Any) -> Identity | None:
        """The other end's tree, if it is on this kernel (see ``describe``)."""
        return _peer(peer)[0]

    def check(self, src: bytes, dst: bytes) -> None:
        """UsageError unless SRC and DST are separate trees."""
        s, d = self.src, self.dst
        if s is None or d is None:
            return
        if s == d:
            how = "is the source"
        elif s in self.dst_lineage:
            how = "is inside the source"
        elif d in self.src_lineage:
            how = "contains the source"
        else:
            return
        raise UsageError(f"source and destination overlap: the destination {display(dst)} {how} {display(src)} "
                         "(judged by device and inode, through mount points and bind mounts)")

    def overlap(self, fd: int) -> str | None:
        """Why the directory ``fd`` (a mount root met inside SRC or DST) must be left alone:
        it shows SRC, a part of SRC or a directory above SRC, or the same of DST. None: it
        is a tree of its own."""
        ident = identity(os.fstat(fd))
        above = lineage(fd, mounts=False)
        if self.src is not None and (self.src in above or ident in self.src_lineage):
            return "a mount showing the source or a directory of it"
        if self.dst is not None and (self.dst in above or ident in self.dst_lineage):
            return "a mount showing the destination or a directory of it"
        return None


def mount_root(fd: int, parent_mount: int) -> tuple[bool, int]:
    """(is ``fd`` the root of a mount other than its parent's, its mount id)."""
    mid = mount_id(fd)
    return mid != parent_mount, mid


def boot_id() -> str:
    """This kernel's boot id: two ends of a sync with the same one share one (dev, ino)
    space, so their trees can overlap (ssh to localhost, a container on this host)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def check_missing_dest(s: Identity | None, dst: bytes, src: bytes) -> None:
    """Before a missing DST is created: UsageError if it would be made inside SRC (the
    directory ``s``): if its nearest existing ancestor is SRC or lies inside it. A new
    directory cannot contain SRC."""
    if s is None:
        return
    path = os.path.abspath(dst)
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            break
        except FileNotFoundError:
            up = os.path.dirname(path)
            if up == path:
                return
            path = up
        except OSError:
            return  # not a directory, or unreadable: creating DST fails with its own message
    try:
        if s in lineage(fd):
            raise UsageError(f"source and destination overlap: the destination {display(dst)} would be created "
                             f"inside the source {display(src)} (judged by device and inode, bind mounts included)")
    finally:
        os.close(fd)


def _peer(raw: Any) -> tuple[Identity | None, frozenset[Identity]]:
    if not isinstance(raw, dict) or not raw.get("boot") or raw.get("boot") != boot_id():
        return None, frozenset()
    return _ident(raw.get("root")), frozenset(i for i in map(_ident, raw.get("lineage") or []) if i is not None)


def _ident(raw: Any) -> Identity | None:
    if isinstance(raw, list | tuple) and len(raw) == 2 and all(isinstance(v, int) for v in raw):
        return (raw[0], raw[1])
    return None


def check_live_source(src: bytes, dst: bytes) -> None:
    """Before a snapshot of SRC is taken (the engine then sees only the snapshot): the same
    refusal against the live SRC, which DST must not overlap either."""
    try:
        sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # reported by the snapshot or the engine
    try:
        try:
            dfd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            check_missing_dest(identity(os.fstat(sfd)), dst, src)
            return
        except OSError:
            return
        try:
            Guard.local(sfd, dfd).check(src, dst)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
