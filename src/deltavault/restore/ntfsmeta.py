"""NTFS metadata and named streams onto the restore target.

Onto an ntfs-3g mount, each entry gets back its security descriptor, DOS attributes, times
and reparse data byte for byte, and each file its named streams: written as the file
``tmp:stream`` (``streams_interface=windows``; opened by name in a directory of our own
the file is moved to meanwhile, fs/ntfsstage.py, and checked to be the inode we just made) or set as ``user.stream`` (``streams_interface=xattr``,
up to 64 KiB). Onto any other file system, small streams are kept as ``user.`` xattrs where
the file system takes them; what could not be kept is counted and said once, at the end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from contextlib import nullcontext

from deltavault.errors import CorruptionError, DeltavaultError
from deltavault.fs.dirfd import DIR_FLAGS, Replaced, fd_path, identity
from deltavault.fs.ntfs import (
    DIRECTORY,
    STREAM_XATTR_MAX,
    WINDOWS,
    XATTR,
    XATTR_STREAM,
    NtfsView,
    apply_meta,
    open_stream_file,
    probe,
    valid_stream_name,
)
from deltavault.fs.ntfsstage import private
from deltavault.fs.paths import display
from deltavault.model.content import content_size
from deltavault.model.nodes import Node, NodeType
from deltavault.model.windows import Stream
from deltavault.objects.reader import iter_content
from deltavault.objects.store import BlobReader
from deltavault.restore.content import verify_fd, write_content
from deltavault.restore.options import RestoreLog
from deltavault.restore.target import install, temp_name, unlink_quiet

_STREAM_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# What a non-NTFS target cannot keep, by WinMeta field, as the warning names it.
_KINDS = (("sd", "security descriptors"), ("attrib", "DOS attributes"), ("times", "creation times"),
          ("reparse", "reparse points"))


class NtfsTarget:
    """What the restore target keeps of the nodes' NTFS metadata."""

    def __init__(self, root_fd: int, repo: BlobReader, log: RestoreLog, *, verify: bool = False) -> None:
        self.view: NtfsView | None = probe(root_fd)
        self.verify = verify  # --verify: streams written as files are read back too
        self.repo = repo
        self.log = log
        self._lock = threading.Lock()
        self.lost: dict[str, int] = {}  # kind -> entries that lost it (non-NTFS target)

    def _lose(self, kind: str) -> None:
        with self._lock:
            self.lost[kind] = self.lost.get(kind, 0) + 1

    def meta(self, fd: int, node: Node, handle: bool) -> list[str]:
        """Descriptor, reparse data, attributes and times onto ``fd`` (last: after POSIX
        mode and times, which would change them)."""
        win = node.win
        if win is None:
            return []
        if self.view is None:
            for field, kind in _KINDS:
                if getattr(win, field) not in (b"", None):
                    self._lose(kind)
            return []
        target: int | bytes = fd_path(fd) if handle else fd
        return apply_meta(target, win, last=False) + apply_meta(target, win, last=True)

    def is_reparse_point(self, node: Node) -> bool:
        """A junction or Windows symlink (ntfs-3g shows it as a symlink), to be made again
        from its reparse data on an NTFS target."""
        return self.view is not None and node.type == NodeType.SYMLINK and node.win is not None \
            and bool(node.win.reparse)

    def place_reparse_point(self, parent: int, node: Node, *, shared: bool) -> list[str]:
        """An empty directory (junction) or file made under a temp name, given the reparse
        data and the rest of its NTFS metadata through its own fd, then renamed into place."""
        win = node.win
        assert win is not None
        tmp = temp_name(node.name)
        is_dir = win.attrib is not None and bool(win.attrib & DIRECTORY)
        if is_dir:
            os.mkdir(tmp, 0o700, dir_fd=parent)
            try:
                fd = os.open(tmp, DIR_FLAGS, dir_fd=parent)
            except BaseException:
                os.rmdir(tmp, dir_fd=parent)
                raise
        else:
            fd = os.open(tmp, _NEW_FILE, 0o600, dir_fd=parent)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise Replaced("not the entry just created")
            messages = apply_meta(fd, win, last=False) + apply_meta(fd, win, last=True)
        except BaseException:
            if is_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(tmp, dir_fd=parent)
            else:
                unlink_quiet(parent, tmp)
            raise
        finally:
            os.close(fd)
        install(parent, tmp, node.name, identity(st) if shared else None)
        return messages

    def streams(self, parent: int, tmp: bytes, fd: int, node: Node, relpath: bytes) -> None:
        """The named streams of the file just written as ``tmp`` in ``parent`` (open as
        ``fd``), or of the directory ``tmp``: as files ``tmp:stream`` while it lies in a
        directory of our own (fs/ntfsstage.py: ntfs-3g finds them by path at every write)."""
        if node.win is None or not node.win.streams:
            return
        for s in node.win.streams:
            if not valid_stream_name(s.name):
                self.log.problem(relpath, "metadata", f"stream {display(s.name)}: name not valid on the target; "
                                 "not restored (it stays in the snapshot)")
        valid = [s for s in node.win.streams if valid_stream_name(s.name)]
        files = self.view is not None and self.view.streams == WINDOWS
        try:
            with private(parent, tmp, fd) if files and valid else nullcontext((parent, tmp)) as (pfd, ptmp):
                for s in valid:
                    self._one(pfd, ptmp, fd, s, relpath)
        except OSError as exc:
            self.log.problem(relpath, "metadata", f"streams: {exc.strerror or exc}; not restored "
                             "(they stay in the snapshot)")
        if files and stat.S_ISDIR(os.fstat(fd).st_mode):  # (written under another path: pages cached under
            for s in valid:                                  # its own, of an earlier version, are stale)
                with contextlib.suppress(OSError):
                    os.close(open_stream_file(parent, tmp, s.name))

    def _one(self, parent: int, tmp: bytes, fd: int, s: Stream, relpath: bytes) -> None:
        """One stream written; what fails is logged."""
        try:
            bad = self._stream(parent, tmp, fd, s)
            if bad:
                self.log.problem(relpath, "verify", f"stream {display(s.name)}: read back differs from what "
                                 "was written: " + "; ".join(bad[:5]))
        except (OSError, DeltavaultError) as exc:
            msg = getattr(exc, "strerror", None) or str(exc)
            if isinstance(exc, OSError) and exc.errno in (errno.EINVAL, errno.ENAMETOOLONG, errno.ERANGE,
                                                          errno.EILSEQ):
                msg = f"name not valid on the target ({msg})"
            self.log.problem(relpath, "metadata", f"stream {display(s.name)}: {msg}; not restored "
                             "(it stays in the snapshot)")

    def _stream(self, parent: int, tmp: bytes, fd: int, s: Stream) -> list[str]:
        """Write one stream; with --verify, what reads back otherwise."""
        if self.view is not None and self.view.streams == WINDOWS:
            sfd = os.open(tmp + b":" + s.name, _STREAM_FLAGS, 0o600, dir_fd=parent)
            try:
                if os.fstat(sfd).st_ino != os.fstat(fd).st_ino:
                    raise OSError(errno.ESTALE, "the file was replaced while its streams were written")
                expect = write_content(self.repo, sfd, Node(name=s.name, type=NodeType.FILE, size=s.size,
                                                            content=s.content), {}, digests=self.verify)
                if not self.verify:
                    return []
                n, bad = verify_fd(self.repo, sfd, s.size, expect)
                self.log.count(bytes_verified=n)
                return bad
            finally:
                os.close(sfd)
        ntfs_xattr = self.view is not None and self.view.streams == XATTR
        if s.size > STREAM_XATTR_MAX:
            self._lose("streams over 64 KiB" if self.view is None else "streams (ntfs-3g streams_interface "
                       "is not windows)")
            return []
        if self.view is not None and not ntfs_xattr:
            self._lose("streams (ntfs-3g streams_interface is not windows)")
            return []
        if content_size(s.content) != s.size:
            raise CorruptionError(f"its content references add up to {content_size(s.content)} bytes, not {s.size}")
        data = b"".join(d if d is not None else bytes(n) for _o, d, n in iter_content(self.repo, s.content))
        try:
            os.setxattr(fd, XATTR_STREAM + s.name, data)
        except OSError as exc:
            if exc.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOTSUP, errno.EOPNOTSUPP):
                self._lose("streams that do not fit in a user. xattr")
                return []
            raise
        return []

    def summary(self) -> str | None:
        """The one warning for a non-NTFS target, or None."""
        if not self.lost:
            return None
        parts = [f"{kind} ({n} entries)" for kind, n in sorted(self.lost.items())]
        where = "the target is not an ntfs-3g mount" if self.view is None else "the target's ntfs-3g mount"
        return f"NTFS metadata not kept: {where}: " + ", ".join(parts)

