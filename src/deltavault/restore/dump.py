"""``dump``: one file of a snapshot as a byte stream, or a directory as a tar (or zip)
archive, written to a stream the caller holds (stdout, a file). Nothing touches a file
system, so none of restore's target checks apply; names inside the archive are the
snapshot's, checked as a restore checks them: each a single component and none listed twice
in one directory (a second "d", a directory after a symlink "d" to a directory outside,
would make "d/x" in the archive extract through that symlink).

A tar carries mode, owner (ids and names), modification time, symlinks, hard links, FIFOs
and device nodes; extended attributes and ACLs are left to ``restore``. Holes come out as
zeros (Python's tar writer keeps none, nor does zip), so a file's size is what is written
for it: a file larger than ``MAX_DUMPED`` is refused before any of it is written.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import time
import zipfile
from collections.abc import Iterator
from typing import BinaryIO

from deltavault.errors import TargetError
from deltavault.fs.paths import display
from deltavault.model.nodes import Node, NodeType
from deltavault.objects.reader import read_ref
from deltavault.objects.store import BlobLoader
from deltavault.objects.trees import load_nodes
from deltavault.restore.content import check_sizes
from deltavault.restore.listing import checked_nodes

_ZERO = bytes(1 << 20)
# The largest file dump writes: 16 TiB, about the largest file ext4 (4 KiB blocks) holds, so
# an archive holding more could not even be stored on it. A writer with the key can store a
# file of 4 EiB of hole in a few bytes of tree; dumped, it was 4 EiB of zeros, written until
# the target filled or the reader stopped. ``restore`` keeps holes and restores such files.
MAX_DUMPED = 1 << 44
_TAR_TYPE = {NodeType.FILE: tarfile.REGTYPE, NodeType.DIR: tarfile.DIRTYPE, NodeType.SYMLINK: tarfile.SYMTYPE,
             NodeType.FIFO: tarfile.FIFOTYPE, NodeType.CHARDEV: tarfile.CHRTYPE,
             NodeType.BLOCKDEV: tarfile.BLKTYPE}


def file_chunks(repo: BlobLoader, node: Node, path: bytes = b"") -> Iterator[bytes]:
    """The content of a file node (at ``path``), in order; a hole as zeros. Its sizes are
    checked now, before the caller writes anything of it (an archive's header)."""
    check_sizes(node)
    if node.size > MAX_DUMPED:
        raise TargetError(f"{display(path or node.name)}: {node.size} bytes, more than dump writes of one file "
                          f"({MAX_DUMPED} bytes, as zeros where the file has holes); restore, which keeps "
                          "holes, restores it")
    return _chunks(repo, node)


def _chunks(repo: BlobLoader, node: Node) -> Iterator[bytes]:
    for ref in node.content:
        data = read_ref(repo, ref)
        if data is not None:
            yield data
            continue
        left = ref.size
        while left:
            n = min(left, len(_ZERO))
            yield _ZERO[:n]
            left -= n


def dump_file(repo: BlobLoader, node: Node, out: BinaryIO) -> int:
    written = 0
    for chunk in file_chunks(repo, node):
        out.write(chunk)
        written += len(chunk)
    return written


class _Stream(io.RawIOBase):
    """A file node's content as a readable stream, for tarfile and zipfile."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._buf = nxt
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def walk_entries(repo: BlobLoader, node: Node, path: bytes) -> Iterator[tuple[bytes, Node]]:
    """``node`` (at ``path``) and everything below it, parents first; iterative, so any
    depth is fine."""
    yield path, node
    stack: list[tuple[bytes, Iterator[Node]]] = []

    def listing(tree: bytes, where: bytes) -> Iterator[Node]:
        return iter(checked_nodes(load_nodes(repo, tree), where.decode("utf-8", "surrogateescape")))

    if node.type == NodeType.DIR and node.subtree is not None:
        stack.append((path, listing(node.subtree, path)))
    while stack:
        base, it = stack[-1]
        n = next(it, None)
        if n is None:
            stack.pop()
            continue
        p = base + b"/" + n.name if base else n.name
        yield p, n
        if n.type == NodeType.DIR and n.subtree is not None:
            stack.append((p, listing(n.subtree, p)))


def dump_tar(repo: BlobLoader, entries: Iterator[tuple[bytes, Node]], out: BinaryIO) -> int:
    """A tar stream (POSIX pax: any name length, raw bytes kept) of ``entries``."""
    count = 0
    links: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for path, n in entries:
            info = tarfile.TarInfo(path.decode("utf-8", "surrogateescape"))
            info.mode, info.uid, info.gid = stat.S_IMODE(n.mode), n.uid, n.gid
            info.uname, info.gname, info.mtime = n.user, n.group, n.mtime // 1_000_000_000
            info.type = _TAR_TYPE[n.type]
            key = (n.dev, n.inode) if n.type == NodeType.FILE and n.links > 1 else None
            data = None
            if key is not None and key in links:
                info.type, info.linkname = tarfile.LNKTYPE, links[key]
            elif n.type == NodeType.FILE:
                info.size = n.size
                data = io.BufferedReader(_Stream(file_chunks(repo, n, path)), 1 << 20)
                if key is not None:
                    links[key] = info.name
            elif n.type == NodeType.SYMLINK:
                info.linkname = n.target.decode("utf-8", "surrogateescape")
            elif n.type in (NodeType.CHARDEV, NodeType.BLOCKDEV):
                info.devmajor, info.devminor = os.major(n.rdev), os.minor(n.rdev)
            tar.addfile(info, data)
            count += 1
    return count


_ZIP_FIRST, _ZIP_LAST = 315532800, 4354819198  # a zip's DOS times: 1980-01-01 to 2107-12-31 23:59:58


def dump_zip(repo: BlobLoader, entries: Iterator[tuple[bytes, Node]], out: BinaryIO) -> int:
    """A zip stream of ``entries``: directories and files (with their mode and time);
    symlinks and special files have no portable form in zip and are left out."""
    count = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for path, n in entries:
            name = path.decode("utf-8", "surrogateescape")
            when = time.gmtime(min(max(n.mtime // 1_000_000_000, _ZIP_FIRST), _ZIP_LAST))[:6]
            if n.type == NodeType.DIR:
                zi = zipfile.ZipInfo(name + "/", when)
                zi.external_attr = (stat.S_IFDIR | stat.S_IMODE(n.mode)) << 16 | 0x10
                zf.writestr(zi, b"")
            elif n.type == NodeType.FILE:
                zi = zipfile.ZipInfo(name, when)
                zi.external_attr = (stat.S_IFREG | stat.S_IMODE(n.mode)) << 16
                zi.compress_type = zipfile.ZIP_DEFLATED
                chunks = file_chunks(repo, n, path)
                with zf.open(zi, "w", force_zip64=n.size > 0x7FFFFFFF) as f:
                    for chunk in chunks:
                        f.write(chunk)
            else:
                continue
            count += 1
    return count
