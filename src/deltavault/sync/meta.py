"""Which metadata a sync carries, and applying it: to open files and directories by their fd,
to entries that are never opened (symlinks, device nodes, FIFOs) by an O_PATH handle."""

from __future__ import annotations

import os
import stat

from deltavault.fs.dirfd import fd_path
from deltavault.fs.meta import ACL_XATTRS, ApplyProblems, XattrRead, apply_meta_fd, read_bounded
from deltavault.fs.ntfs import STREAMS_LIST
from deltavault.sync.options import SyncOptions


class MetaPolicy:
    def __init__(self, opts: SyncOptions) -> None:
        self.acl = opts.acl
        self.xattrs = opts.xattrs
        self.chown = opts.owner and os.geteuid() == 0
        # --streams from NTFS onto a DST that is not: DST's user.* xattrs mirror SRC's small
        # streams (set by the local engine once it knows both sides: local/ntfs.py)
        self.stream_xattrs = False

    def owner(self, src: os.stat_result) -> int:
        """The user an entry made for SRC's ``src`` belongs to: its own when owners are kept
        (as root), else whoever syncs."""
        return src.st_uid if self.chown else os.geteuid()

    @property
    def any_xattrs(self) -> bool:
        return self.acl or self.xattrs or self.stream_xattrs

    def wants(self, name: bytes) -> bool:
        if name == STREAMS_LIST:  # ntfs-3g's list of a file's streams, not an xattr (--streams)
            return False
        if self.stream_xattrs and name.startswith(b"user."):
            return True
        return self.acl if name in ACL_XATTRS else self.xattrs

    def source_xattrs(self, *, fd: int | None = None, path: bytes = b"") -> XattrRead | None:
        """The xattrs to mirror, up to fs.meta.INLINE_MAX together (what is left out is in
        the result), or None when neither --acl nor --xattrs is on."""
        if not self.any_xattrs:
            return None
        return read_bounded(fd if fd is not None else path, want=self.wants)

    def handle_differs(self, h: int, have: os.stat_result, src: os.stat_result,
                       src_xattrs: list[tuple[bytes, bytes]] | None) -> bool:
        """Whether DST's entry, open as the ``O_PATH`` handle ``h`` (met as ``have``), differs
        from SRC's ``src``; its xattrs read up to INLINE_MAX: one that holds more than can
        be read differs."""
        if src_xattrs is None:
            return self.differs(have, src, None, None)
        got = read_bounded(fd_path(h), follow=True)
        return got.left() is not None or self.differs(have, src, got.values, src_xattrs)

    def differs(self, dst: os.stat_result, src: os.stat_result, dst_xattrs: list[tuple[bytes, bytes]] | None,
                src_xattrs: list[tuple[bytes, bytes]] | None, *, times: bool = True) -> bool:
        if not stat.S_ISLNK(src.st_mode) and stat.S_IMODE(dst.st_mode) != stat.S_IMODE(src.st_mode):
            return True
        if self.chown and (dst.st_uid, dst.st_gid) != (src.st_uid, src.st_gid):
            return True
        if times and dst.st_mtime_ns != src.st_mtime_ns:
            return True
        if src_xattrs is not None:
            mine = [x for x in (dst_xattrs or []) if self.wants(x[0])]
            return mine != src_xattrs
        return False

    def apply_fd(self, fd: int, st: os.stat_result, xattrs: list[tuple[bytes, bytes]] | None, *,
                 chmod: bool = True, chown: bool = True) -> list[str]:
        """Metadata of an open file or directory: the problems, as messages. ``chmod`` and
        ``chown`` False: the file was created with them already."""
        probs = ApplyProblems([])
        apply_meta_fd(fd, probs, mode=st.st_mode if chmod else None, uid=st.st_uid, gid=st.st_gid,
                      atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns, xattrs=xattrs,
                      owner=self.chown and chown, drop_xattr=self.wants)
        return probs.messages

    def apply_handle(self, handle: int, st: os.stat_result,
                     xattrs: list[tuple[bytes, bytes]] | None) -> list[str]:
        """Metadata of an entry that is never opened (symlink, device node, FIFO, or a file
        kept as it is), through an ``O_PATH`` handle to it (fs.dirfd): the calls name that
        object and no path, so nothing swapped in under its name is changed."""
        probs = ApplyProblems([])
        apply_meta_fd(handle, probs, mode=None if stat.S_ISLNK(st.st_mode) else st.st_mode, uid=st.st_uid,
                      gid=st.st_gid, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns, xattrs=xattrs,
                      owner=self.chown, drop_xattr=self.wants, handle=True)
        return probs.messages
