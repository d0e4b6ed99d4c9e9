"""Capturing a directory tree's content and metadata, for exact comparisons in tests."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path
from typing import Any


def xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in names:
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            pass
    return out


def manifest(root: str | Path, *, times: bool = True, owner: bool = True) -> dict[bytes, dict[str, Any]]:
    """Everything a restore must reproduce, keyed by raw relative path. Hard links show up
    as a shared ``link_group`` (the smallest path of the group)."""
    rootb = os.fsencode(str(root))
    out: dict[bytes, dict[str, Any]] = {}
    groups: dict[tuple[int, int], bytes] = {}
    for dirpath, dirs, files in os.walk(rootb):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, rootb)
            st = os.lstat(p)
            e: dict[str, Any] = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
                                 "xattrs": xattrs(p)}
            if owner:
                e["uid"], e["gid"] = st.st_uid, st.st_gid
            if times and not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
                e["mtime_ns"] = st.st_mtime_ns
            if stat.S_ISREG(st.st_mode):
                e["sha256"] = content_digest(p, st.st_size)
                e["size"] = st.st_size
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    groups.setdefault(key, rel)
                    e["link_group"] = key
            elif stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e["rdev"] = st.st_rdev
            out[rel] = e
    # Replace (dev, ino) by the group's first path so two trees compare.
    first: dict[tuple[int, int], bytes] = {}
    for rel in sorted(out):
        g = out[rel].get("link_group")
        if g is not None:
            first.setdefault(g, rel)
            out[rel]["link_group"] = first[g]
    return out


def content_digest(path: bytes, size: int) -> str:
    """SHA-256 over (offset, bytes) of each data extent: holes are not read, so a 5 GiB
    sparse file costs its data only. Equal digests mean equal content and equal holes."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            h.update(start.to_bytes(8, "little"))
            off = start
            while off < end:
                b = os.pread(fd, min(1 << 20, end - off), off)
                if not b:
                    break
                h.update(b)
                off += len(b)
            pos = end
    finally:
        os.close(fd)
    return h.hexdigest()


def allocated(path: str | Path) -> int:
    return os.lstat(path).st_blocks * 512


def remove_tree(root: Path) -> None:
    """rmtree for trees too deep for shutil.rmtree (which recurses) and past PATH_MAX."""
    stack = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    names: list[bytes] = []
    while stack:
        fd = stack[-1]
        sub = None
        for name in os.listdir(fd):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if (st.st_mode & 0o170000) == 0o040000:
                os.chmod(name, 0o700, dir_fd=fd)
                sub = name
                break
            os.unlink(name, dir_fd=fd)
        if sub is not None:
            stack.append(os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd))
            names.append(os.fsencode(sub))
            continue
        os.close(stack.pop())
        if stack:
            os.rmdir(names.pop(), dir_fd=stack[-1])
    shutil.rmtree(root, ignore_errors=True)
