"""Which metadata a sync carries, and applying it to entries that are never opened
(symlinks, device nodes, FIFOs). Open files and directories use fs.meta.apply_meta_fd."""

from __future__ import annotations

import errno
import os
import stat

from deltavault.fs.meta import ACL_XATTRS, ApplyProblems, apply_meta_fd, apply_xattrs, read_xattrs
from deltavault.fs.paths import proc_path
from deltavault.sync.options import SyncOptions


class MetaPolicy:
    def __init__(self, opts: SyncOptions) -> None:
        self.acl = opts.acl
        self.xattrs = opts.xattrs
        self.chown = opts.owner and os.geteuid() == 0

    @property
    def any_xattrs(self) -> bool:
        return self.acl or self.xattrs

    def wants(self, name: bytes) -> bool:
        return self.acl if name in ACL_XATTRS else self.xattrs

    def source_xattrs(self, *, fd: int | None = None, path: bytes = b"") -> list[tuple[bytes, bytes]] | None:
        """The xattrs to mirror, or None when neither --acl nor --xattrs is on."""
        if not self.any_xattrs:
            return None
        return [x for x in read_xattrs(path, fd=fd) if self.wants(x[0])]

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

    def apply_at(self, dir_fd: int, name: bytes, st: os.stat_result,
                 xattrs: list[tuple[bytes, bytes]] | None, problems: ApplyProblems) -> None:
        """Metadata of a symlink or special file, without following it."""
        if xattrs is not None:
            apply_xattrs(proc_path(dir_fd, name), xattrs, problems, clear_others=True, only=self.wants)
        if self.chown:
            try:
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as exc:
                problems.add("chown", exc)
        if not stat.S_ISLNK(st.st_mode):
            try:
                os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
            except OSError as exc:
                problems.add("chmod", exc)
        try:
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENOTSUP:
                problems.add("utime", exc)
