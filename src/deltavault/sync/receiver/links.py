"""Hard links in DST. A group's names are linked once every file is in place, to the file
this run installed or kept for the group, through a handle whose identity is that file,
never from a path; a kept file with a link outside the group (maybe to a file outside
DST) is first replaced by a copy. Shared by the local engine and the agent."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from deltavault.fs.clone import reflink
from deltavault.fs.dirfd import (
    Identity,
    Replaced,
    expect_identity,
    handle_at,
    identity,
    link_handle,
    lstat_at,
    open_dir_path,
    rename_checked,
    reopen,
)
from deltavault.fs.meta import ApplyProblems, apply_meta_fd, read_bounded
from deltavault.fs.paths import display
from deltavault.sync.data import BufferPool, copy_data
from deltavault.sync.receiver.temps import Temps

WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Where each counted what it did with a group's first file (for merging workers' counts).
COUNTER = {"delta": "files_delta", "update": "files_updated", "new": "files_new"}


class Groups:
    """The run's hard-link groups (thread-safe): names to link to a group's first path, and
    the file at each first path, by identity, with whether this run installed it (else
    it was kept as it was: see ``needs_copy``)."""

    def __init__(self) -> None:
        self.pending: list[tuple[bytes, bytes]] = []  # (name, its group's first path)
        self.targets: dict[bytes, tuple[Identity, bool]] = {}
        self.copies: dict[bytes, str] = {}  # first path -> the stats counter its file went to
        self.made: set[bytes] = set()  # names linked

    def add(self, rel: bytes, first: bytes) -> None:
        self.pending.append((rel, first))

    def installed(self, rel: bytes, ident: Identity, action: str) -> None:
        self.targets[rel] = (ident, True)
        self.copies[rel] = COUNTER.get(action, "files_new")

    def kept(self, rel: bytes, ident: Identity) -> None:
        self.targets[rel] = (ident, False)

    def by_first(self) -> dict[bytes, list[bytes]]:
        groups: dict[bytes, list[bytes]] = {}
        for rel, first in self.pending:
            groups.setdefault(first, []).append(rel)
        return groups


def link_target(root: int, first: bytes, want: Identity) -> tuple[int, os.stat_result]:
    """A handle to DST/first, which must be the regular file ``want`` (installed or kept
    by this run for the group). Replaced or FileNotFoundError otherwise."""
    fdir, _, fname = first.rpartition(b"/")
    ffd = open_dir_path(root, fdir)
    try:
        h, st = expect_identity(ffd, fname, want)
    finally:
        os.close(ffd)
    if not stat.S_ISREG(st.st_mode):
        os.close(h)
        raise Replaced("not a regular file")
    return h, st


def link_failed(first: bytes, exc: OSError) -> str:
    """The problem message of a group whose file cannot be linked to."""
    if isinstance(exc, FileNotFoundError):
        return f"hard link to {display(first)}, which was not synced"
    return f"hard link to {display(first)}: {exc.strerror or exc}"


def names_in_place(root: int, rels: list[bytes], want: Identity) -> int:
    """How many of the paths ``rels`` are names of the file ``want`` now."""
    n = 0
    for rel in rels:
        pdir, _, name = rel.rpartition(b"/")
        try:
            pfd = open_dir_path(root, pdir)
        except OSError:
            continue
        try:
            st = lstat_at(pfd, name)
        finally:
            os.close(pfd)
        n += st is not None and (st.st_dev, st.st_ino) == want
    return n


def needs_copy(root: int, first: bytes, rels: list[bytes], handle_st: os.stat_result) -> bool:
    """A kept (not installed) group file gets new names only if every link it has is a name
    of the group in DST: one more may be a hard link to a file outside DST, which must not
    get another name. Then it is first replaced by a copy (``detach``)."""
    names = [first, *rels]
    have = names_in_place(root, names, identity(handle_st))
    return have < len(names) and have != handle_st.st_nlink


def detach(root: int, first: bytes, handle: int, temps: Temps,
           buffers: BufferPool) -> tuple[int, os.stat_result, list[str]]:
    """Replace DST/first by a copy of the file ``handle`` names (a reflink where the file
    system can), with its metadata; returns a handle to the copy (from the fd it was
    written through), its stat, and what of its metadata was not read or not set."""
    st = os.fstat(handle)
    fdir, _, fname = first.rpartition(b"/")
    dfd = open_dir_path(root, fdir)
    try:
        src = reopen(handle, os.O_RDONLY)
        try:
            with temps.made((fdir, None), dfd, fname) as tmp:
                h, problems = _copy(src, st, dfd, tmp, buffers)
                try:
                    hst = os.fstat(h)
                    rename_checked(dfd, tmp, fname, identity(hst))
                except BaseException:
                    os.close(h)
                    raise
        finally:
            os.close(src)
        return h, hst, problems
    finally:
        os.close(dfd)


def _copy(src: int, st: os.stat_result, dfd: int, tmp: bytes, buffers: BufferPool) -> tuple[int, list[str]]:
    """A new file ``tmp`` in ``dfd`` with the content and metadata of ``src`` (``st``), its
    xattrs read up to fs.meta.INLINE_MAX together: an ``O_PATH`` handle to it, and the
    problems (what was left out, what could not be set)."""
    tfd = os.open(tmp, WRITE_FLAGS, 0o600, dir_fd=dfd)
    try:
        if not reflink(src, tfd):
            copy_data(src, tfd, st, buffers, None, lambda: False)
        got = read_bounded(src)
        left = got.left()
        probs = ApplyProblems([] if left is None else [left])
        apply_meta_fd(tfd, probs, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, atime_ns=st.st_atime_ns,
                      mtime_ns=st.st_mtime_ns, xattrs=got.values, owner=os.geteuid() == 0)
        return reopen(tfd, os.O_PATH), probs.messages
    finally:
        os.close(tfd)


def hard_link(root: int, rel: bytes, handle: int, hst: os.stat_result, temps: Temps,
              clear_dir: Callable[[int, bytes], bool]) -> str:
    """Make DST/rel another name of the file ``handle`` names: "hardlink", "same" (it is
    already), or "blocked" (a directory is in the way and ``clear_dir(dir_fd, name)`` did
    not remove it)."""
    pdir, _, name = rel.rpartition(b"/")
    pfd = open_dir_path(root, pdir)
    try:
        cur = lstat_at(pfd, name)
        if cur is not None and (cur.st_dev, cur.st_ino) == identity(hst):
            return "same"
        if cur is not None and stat.S_ISDIR(cur.st_mode) and not clear_dir(pfd, name):
            return "blocked"
        with temps.made((pdir, None), pfd, name) as tmp:
            link_handle(handle, pfd, tmp)
            rename_checked(pfd, tmp, name, identity(hst))
        return "hardlink"
    finally:
        os.close(pfd)


def regular_at(root: int, rel: bytes) -> tuple[int, os.stat_result]:
    """A handle to DST/rel, which must be a regular file (FileNotFoundError otherwise)."""
    pdir, _, name = rel.rpartition(b"/")
    pfd = open_dir_path(root, pdir)
    try:
        h, st = handle_at(pfd, name)
    finally:
        os.close(pfd)
    if not stat.S_ISREG(st.st_mode):
        os.close(h)
        raise FileNotFoundError(errno.ENOENT, "not a regular file")
    return h, st
