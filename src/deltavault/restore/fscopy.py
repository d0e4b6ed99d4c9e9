"""Copying chosen paths of a mounted file system into a restore target, with metadata.

The source is a file system this process mounted read-only from a volume snapshot; the
target may be written in by other users while we work, so it is written as a file restore
writes it (restore/target.py): directories entered by fd with ``O_NOFOLLOW``, each entry
made under a temp name, checked, given its metadata through its own fd or handle, then
renamed into place; a directory's metadata last. The source is walked by fd too, with its
own stack, so neither depth nor a symlink inside it leads anywhere else.

NTFS (through ntfs-3g) keeps its security descriptor, attributes and creation time in
``system.ntfs_acl``, ``system.ntfs_attrib`` and ``system.ntfs_crtime``, which other file
systems cannot hold; the copy carries them as ``user.ntfs_acl`` (and so on), byte for byte.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from deltavault.errors import NO_SPACE_ERRNOS, NoSpace, UsageError
from deltavault.fs.clone import pwrite_all
from deltavault.fs.dirfd import DIR_FLAGS, Replaced, handle_at, identity, open_dir_at, reopen
from deltavault.fs.meta import read_bounded
from deltavault.fs.paths import check_name, display
from deltavault.model.nodes import Node, NodeType
from deltavault.progress import NullReporter, Reporter
from deltavault.restore.root import TargetRoot
from deltavault.restore.target import (
    LinkSources,
    MetaOptions,
    apply_node_meta,
    final_of,
    install,
    make_dir,
    place_special,
    temp_name,
    unlink_quiet,
)

CHUNK = 1 << 20
NTFS_XATTRS = (b"system.ntfs_acl", b"system.ntfs_attrib", b"system.ntfs_crtime")
_TYPES = {stat.S_IFREG: NodeType.FILE, stat.S_IFDIR: NodeType.DIR, stat.S_IFLNK: NodeType.SYMLINK,
          stat.S_IFIFO: NodeType.FIFO, stat.S_IFCHR: NodeType.CHARDEV, stat.S_IFBLK: NodeType.BLOCKDEV}


@dataclass
class CopyStats:
    files: int = 0
    dirs: int = 0
    links: int = 0
    other: int = 0
    bytes_copied: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, what went wrong)


def _node(dir_fd: int, name: bytes, st: os.stat_result, ntfs: bool, path: bytes,
          problem: Callable[[bytes, str], None]) -> Node:
    """The entry ``name`` of ``dir_fd`` (the copy's ``path``) as a node; its xattrs up to
    fs.meta.INLINE_MAX together, what is left out given to ``problem(path, message)``."""
    kind = _TYPES.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        raise OSError(errno.EINVAL, "a socket or unknown file type; not copied")
    where = b"/proc/self/fd/%d/%s" % (dir_fd, name)
    xattrs: list[tuple[bytes, bytes]] = []
    if kind != NodeType.SYMLINK:
        got = read_bounded(where)
        xattrs, left = got.values, got.left()
        if left is not None:
            problem(path, left)
    if ntfs and kind != NodeType.SYMLINK:
        for key in NTFS_XATTRS:
            try:
                xattrs.append((b"user." + key.split(b".", 1)[1], os.getxattr(where, key)))
            except OSError:
                pass
    target = os.readlink(name, dir_fd=dir_fd) if kind == NodeType.SYMLINK else b""
    return Node(name=name, type=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                mtime=st.st_mtime_ns, atime=st.st_atime_ns, size=st.st_size, links=st.st_nlink,
                rdev=st.st_rdev, target=os.fsencode(target), xattrs=sorted(xattrs))


class TreeCopier:
    def __init__(self, source: str, target: str, *, owner: bool = True, ntfs: bool = False,
                 reporter: Reporter | None = None) -> None:
        self.source = source
        self.target = os.fsencode(target)
        self.meta = MetaOptions(owner=owner)
        self.ntfs = ntfs
        self.reporter = reporter or NullReporter()
        self.stats = CopyStats()

    def problem(self, path: bytes, message: str) -> None:
        self.stats.problems.append((display(path), message))
        self.reporter.problem(display(path), "copy", message)

    def run(self, paths: list[str]) -> CopyStats:
        src = os.open(self.source, DIR_FLAGS)
        try:
            with TargetRoot(self.target) as target:  # (taken for the run if others reach it: restore/root.py)
                self._copy_paths(src, target, paths)
        finally:
            os.close(src)
        return self.stats

    def _copy_paths(self, src: int, target: TargetRoot, paths: list[str]) -> None:
        dst = target.fd
        links = LinkSources(dst)
        try:
            for p in paths:
                parts = [check_name(os.fsencode(c)) for c in p.split("/") if c and c != "."]
                if not parts or b".." in parts:
                    raise UsageError(f"--files {p!r}: give a path inside the file system")
                try:
                    self._copy_path(src, dst, parts, links)
                except OSError as exc:
                    if exc.errno in NO_SPACE_ERRNOS:
                        raise NoSpace(f"the restore target is full while copying {p}") from exc
                    self.problem(b"/".join(parts), exc.strerror or str(exc))
        finally:
            links.close()
            for msg in target.release():
                self.problem(b"/", msg)

    def _copy_path(self, src: int, dst: int, parts: list[bytes], links: LinkSources) -> None:
        """The parents of the path as directories (with their metadata), then the path."""
        chain: list[tuple[int, int, Node | None]] = [(os.dup(src), os.dup(dst), None)]
        try:
            for i, comp in enumerate(parts[:-1]):
                s, d, _ = chain[-1]
                st = os.stat(comp, dir_fd=s, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.ENOTDIR, f"{display(comp)} is not a directory in the file system")
                node = _node(s, comp, st, self.ntfs, b"/".join(parts[:i + 1]), self.problem)
                ns = open_dir_at(s, comp)
                try:
                    nd, _st, _made = make_dir(d, comp, final_of(node, self.meta))
                except BaseException:
                    os.close(ns)
                    raise
                chain.append((ns, nd, node))
            s, d, _ = chain[-1]
            self._copy_tree(s, d, parts[-1], b"/".join(parts), links)
        finally:
            for sfd, dfd, meta in reversed(chain):  # innermost first: times set after what is made in it
                if meta is not None:
                    for msg in apply_node_meta(dfd, meta, self.meta):
                        self.problem(b"/".join(parts), msg)
                os.close(sfd)
                os.close(dfd)

    def _copy_tree(self, s: int, d: int, name: bytes, rel: bytes, links: LinkSources) -> None:
        """``name`` of directory fd ``s`` into directory fd ``d``, depth first with a stack."""
        stack: list[tuple[int, int, Node, list[bytes], bytes]] = []
        pending: list[tuple[int, int, bytes, bytes]] = [(s, d, name, rel)]
        while pending or stack:
            if pending:
                ps, pd, nm, path = pending.pop()
                try:
                    made = self._entry(ps, pd, nm, path, links)
                except OSError as exc:
                    if exc.errno in NO_SPACE_ERRNOS:
                        raise
                    self.problem(path, exc.strerror or str(exc))
                    made = None
                if made is not None:
                    sfd, dfd, node = made
                    names = sorted(os.fsencode(n) for n in os.listdir(sfd))
                    stack.append((sfd, dfd, node, names, path))
                continue
            sfd, dfd, node, names, path = stack[-1]
            if names:
                child = names.pop()
                pending.append((sfd, dfd, child, path + b"/" + child))
                continue
            stack.pop()
            for msg in apply_node_meta(dfd, node, self.meta):
                self.problem(path, msg)
            os.close(sfd)
            os.close(dfd)

    def _entry(self, s: int, d: int, name: bytes, path: bytes,
               links: LinkSources) -> tuple[int, int, Node] | None:
        """Copy one entry; for a directory, return (source fd, target fd, node) to descend."""
        st = os.stat(name, dir_fd=s, follow_symlinks=False)
        node = _node(s, name, st, self.ntfs, path, self.problem)
        shared = True  # the target may be anybody's
        if node.type == NodeType.DIR:
            nd, _st, _made = make_dir(d, name, final_of(node, self.meta))
            self.stats.dirs += 1
            return open_dir_at(s, name), nd, node
        if node.type != NodeType.FILE:
            for msg in place_special(d, node, self.meta, shared=shared):
                self.problem(path, msg)
            self.stats.other += 1
            return None
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            links.link(key, d, name, shared=shared)
            self.stats.links += 1
            return None
        if st.st_nlink > 1:
            links.reserve(key)
        self._file(s, d, node, path, links if st.st_nlink > 1 else None, key)
        return None

    def _file(self, s: int, d: int, node: Node, path: bytes, links: LinkSources | None,
              key: tuple[int, int]) -> None:
        h, st = handle_at(s, node.name)
        try:
            if not stat.S_ISREG(st.st_mode):
                raise Replaced("not a regular file")
            src = reopen(h, os.O_RDONLY)
        finally:
            os.close(h)
        tmp = temp_name(node.name)
        try:
            out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=d)
        except BaseException:
            os.close(src)
            raise
        try:
            self.stats.bytes_copied += _copy_data(src, out, st.st_size)
            for msg in apply_node_meta(out, node, self.meta):
                self.problem(path, msg)
            ident = identity(os.fstat(out))
            install(d, tmp, node.name, ident)
            if links is not None:
                links.add(key, path, out)
            self.stats.files += 1
            self.reporter.advance(nbytes=st.st_size, items=1)
        except BaseException:
            unlink_quiet(d, tmp)
            raise
        finally:
            os.close(src)
            os.close(out)


def _copy_data(src: int, out: int, size: int) -> int:
    """The data extents of ``src`` into ``out`` at the same offsets: holes stay holes."""
    copied = 0
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
            end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            start, end = pos, size  # no SEEK_DATA here: all of it is data
        while start < end:
            data = os.pread(src, min(CHUNK, end - start), start)
            if not data:
                end = start
                break
            pwrite_all(out, data, start)
            start += len(data)
            copied += len(data)
        pos = max(end, pos + 1)
    os.ftruncate(out, size)
    return copied
