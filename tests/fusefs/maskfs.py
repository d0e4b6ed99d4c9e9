"""A FUSE file system passing everything through to a directory, except that it gives a
new file its mode less a mask of its own (as an sshfs server's umask does, or an NFS or ZFS
server's inherited ACL): chmod still sets any mode. Run as
``python -m tests.fusefs.maskfs BACKING MOUNTPOINT MASK`` (octal); it serves until unmounted."""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import mfusepy

_STAT = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")


class MaskFs(mfusepy.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, root: str, mask: int) -> None:
        self.root, self.mask = root, mask

    def _p(self, path: str) -> str:
        return self.root + path

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._p(path))
        out = {k: getattr(st, k) for k in _STAT}
        for k in ("atime", "mtime", "ctime"):
            out[f"st_{k}"] = out.pop(f"st_{k}_ns")
        return out

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._p(path))]

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._p(path), mode)
        return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return os.open(self._p(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode & ~self.mask)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._p(path), flags & ~os.O_NOFOLLOW)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        os.truncate(fh if fh is not None else self._p(path), length)
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        os.fsync(fh)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._p(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.lchown(self._p(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        os.utime(self._p(path), ns=times, follow_symlinks=False)
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._p(old), self._p(new))
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._p(path))
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._p(path))
        return 0

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        raise mfusepy.FuseOSError(errno.ENOTSUP)

    def listxattr(self, path: str) -> list[str]:
        return []

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._p(path))
        return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                            "f_files", "f_ffree", "f_favail", "f_namemax")}


if __name__ == "__main__":
    mfusepy.FUSE(MaskFs(sys.argv[1], int(sys.argv[3], 8)), sys.argv[2], foreground=True, allow_other=True,
                 default_permissions=True)
