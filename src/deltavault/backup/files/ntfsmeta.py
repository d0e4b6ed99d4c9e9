"""NTFS metadata and named streams of the entries of a source on an ntfs-3g mount.

The descriptor, DOS attributes, times and reparse data go into the node's ``win``; named
streams are content, read like a file's data (``streams_interface=windows``: the file
``name:stream``, opened through a handle checked to be the same inode) or taken from the
``user.*`` xattr (``streams_interface=xattr``), and chunked and deduplicated alike. A
stream is only read when its file is (stat data changed): ntfs-3g keeps one mtime per
file, so a changed stream makes its file and all its streams be read again; only the
changed chunks are stored. A file whose stat data is unchanged has its stream names
checked (``same_streams``): removing a stream through ntfs-3g moves no time.
"""

from __future__ import annotations

import errno
import os

import msgspec

from deltavault.backup.files.content import ContentReader
from deltavault.backup.files.nodes import bounded_xattrs
from deltavault.backup.files.options import RunLog
from deltavault.backup.files.pending import PendingContent
from deltavault.fs.dirfd import HANDLE_FLAGS, NotRegular, fd_path, handle_at, identity
from deltavault.fs.ntfs import (
    NONE,
    STREAMS_LIST,
    WINDOWS,
    NtfsView,
    is_ntfs_xattr,
    open_stream_file,
    probe,
    read_meta,
    valid_stream_name,
)
from deltavault.fs.paths import display
from deltavault.model.nodes import Node
from deltavault.model.windows import Stream, WinMeta

PendingStreams = list[tuple[Stream, PendingContent]]


def for_source(path: bytes, content: ContentReader, log: RunLog) -> NtfsEntries | None:
    """An ``NtfsEntries`` when the source ``path`` lies on an ntfs-3g mount."""
    try:
        h = os.open(path, HANDLE_FLAGS & ~os.O_NOFOLLOW)
    except OSError:
        return None  # the walk reports it
    try:
        view = probe(h)
        dev = os.fstat(h).st_dev
    finally:
        os.close(h)
    return None if view is None else NtfsEntries(view, content, log, path, dev)


class NtfsEntries:
    """Adds NTFS metadata to the nodes of one source on an ntfs-3g mount."""

    def __init__(self, view: NtfsView, content: ContentReader, log: RunLog, source: bytes, dev: int) -> None:
        self.view = view
        self.dev = dev  # the ntfs-3g mount's: entries of another file system mounted below are not NTFS
        self.content = content
        self.log = log
        if view.streams == NONE:
            log.problem(source, "metadata", "on an ntfs-3g mount without streams_interface=windows or xattr: "
                        "named data streams are not visible and not stored", partial=False)

    def xattrs(self, fd: int, path: bytes) -> list[tuple[bytes, bytes]]:
        """The xattrs of an open entry. ntfs-3g (2022.10) fails listxattr with EINVAL or
        ENODATA on some files (one with named streams, once mounted again, with
        streams_interface=windows); they have no xattrs of their own there: []."""
        # (not the streams of the xattr interface: read_meta reads them, bounded)
        return bounded_xattrs(self.log, fd, path, want=lambda n: not is_ntfs_xattr(n, self.view),
                              quiet=(errno.EINVAL, errno.ENODATA))

    def node(self, node: Node, target: int | bytes, path: bytes, *, dir_fd: int = -1,
             fsname: bytes = b"", ino: int = 0) -> tuple[Node, PendingStreams]:
        """``node`` with its NTFS metadata, and its streams being stored (read when
        ``dir_fd`` and ``fsname`` name its file, an open regular file of inode ``ino``)."""
        want_streams = dir_fd >= 0
        try:
            got = read_meta(target, self.view, streams=want_streams)
        except OSError as exc:
            self.log.problem(path, "metadata", f"NTFS metadata unreadable: {exc.strerror or exc}")
            return node, []
        for w in got.warnings:
            self.log.problem(path, "metadata", w, partial=False)
        for w in got.losses:
            self.log.problem(path, "metadata", w)
        xattrs = [(n, v) for n, v in node.xattrs if not is_ntfs_xattr(n, self.view)]
        pending: PendingStreams = []
        for name in got.stream_names:
            if not valid_stream_name(name):  # never joined into a path
                self.log.problem(path, "unreadable", f"stream {display(name)}: a name no stream can have; not read")
                continue
            if name in got.inline:
                data = got.inline[name]
                pc = self.content.small(data)
                self.log.stats.bytes_read += len(data)
                pending.append((Stream(name=name, size=len(data)), pc))
            elif self.view.streams == WINDOWS and want_streams:
                one = self._stream(dir_fd, fsname, name, ino, path)
                if one is not None:
                    pending.append(one)
        self.log.stats.bytes_total += sum(s.size for s, _ in pending)
        win = WinMeta(sd=got.sd, owner=got.owner, attrib=got.attrib, times=got.times, reparse=got.reparse,
                      streams=[s for s, _ in pending])
        return msgspec.structs.replace(node, xattrs=xattrs, win=win), pending

    def same_streams(self, dir_fd: int, fsname: bytes, st: os.stat_result, prev: Node) -> bool:
        """Has the file ``fsname`` of ``dir_fd``, whose stat data is ``prev``'s, the
        streams ``prev`` recorded? Removing a stream moves no time of its file through
        ntfs-3g's streams_interface=windows (docs/windows.md), so their names are asked for;
        any other change of a stream moves its file's ctime. In doubt: False (it is read)."""
        if self.view.streams != WINDOWS or st.st_dev != self.dev:
            return True  # (through the xattr interface, a removal moves the ctime)
        try:
            h, hst = handle_at(dir_fd, fsname)
        except OSError:
            return False
        try:
            if identity(hst) != identity(st):
                return False
            raw = os.getxattr(fd_path(h), STREAMS_LIST)
        except OSError:
            return False
        finally:
            os.close(h)
        had = [x.name for x in prev.win.streams] if prev.win is not None else []
        return sorted(n for n in raw.split(b"\0") if n) == sorted(had)

    def node_at(self, node: Node, dir_fd: int, fsname: bytes, path: bytes, st: os.stat_result) -> Node:
        """``node`` (a symlink or special file, not opened) with its NTFS metadata, read
        through a handle checked to be the entry listed."""
        try:
            h, hst = handle_at(dir_fd, fsname)
        except OSError as exc:
            self.log.problem(path, "metadata", f"NTFS metadata unreadable: {exc.strerror or exc}")
            return node
        try:
            if identity(hst) != identity(st):
                self.log.problem(path, "changed", "replaced while being read")
                return node
            return self.node(node, fd_path(h), path)[0]
        finally:
            os.close(h)

    def _stream(self, dir_fd: int, fsname: bytes, name: bytes, ino: int,
                path: bytes) -> tuple[Stream, PendingContent] | None:
        where = f"stream {display(name)}"
        try:
            fd = open_stream_file(dir_fd, fsname, name)
        except (NotRegular, OSError) as exc:
            self.log.problem(path, "unreadable", f"{where}: {getattr(exc, 'strerror', None) or exc}")
            return None
        try:
            st = os.fstat(fd)
            if st.st_ino != ino:
                self.log.problem(path, "changed", f"{where}: the file was replaced while being read")
                return None
            pc = self.content.read(fd, st, None, page_digests=False)
        except OSError as exc:
            self.log.problem(path, "unreadable", f"{where}: read error: {exc.strerror or exc}")
            return None
        finally:
            os.close(fd)
        self.log.stats.bytes_read += pc.bytes_read
        return Stream(name=name, size=st.st_size), pc


def resolve_streams(node: Node, pending: PendingStreams) -> Node:
    """The node with its streams' content references, once stored."""
    if node.win is None or not pending:
        return node
    streams = [msgspec.structs.replace(s, content=pc.refs()) for s, pc in pending]
    return msgspec.structs.replace(node, win=msgspec.structs.replace(node.win, streams=streams))


def streams_done(pending: PendingStreams | None) -> bool:
    return not pending or all(pc.done() for _s, pc in pending)
