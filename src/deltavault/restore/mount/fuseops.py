"""The kernel's questions, answered from the namespace (mfusepy over libfuse3's high-level
API; paths arrive as ``str`` decoded with surrogateescape, so raw byte names survive).

Read-only: the mount is made ``ro`` and nothing here writes. ``default_permissions`` makes
the kernel check each snapshot's own modes, owners and POSIX ACLs (FUSE_CAP_POSIX_ACL), so
with ``--allow-other`` a user reads only what the backed-up system let them read.
"""

from __future__ import annotations

import ctypes.util
import errno
import itertools
import os
import threading
from collections.abc import Callable
from typing import Any

# mfusepy loads libfuse 2 when both are installed (borg's llfuse brings it): name libfuse3.
if not os.environ.get("FUSE_LIBRARY_PATH") and ctypes.util.find_library("fuse3"):
    os.environ["FUSE_LIBRARY_PATH"] = str(ctypes.util.find_library("fuse3"))

import mfusepy

from deltavault.errors import DeltavaultError
from deltavault.restore.mount.namespace import Namespace
from deltavault.restore.mount.views import View

LIBFUSE_MAJOR: int = mfusepy.fuse_version_major
FUSE_CAP_POSIX_ACL = 1 << 19  # fuse_common.h (libfuse 3)
ATTR_TIMEOUT = 1.0  # seconds the kernel may keep attributes and names; trees never change


class MountOps(mfusepy.Operations):  # type: ignore[misc]
    use_ns = True  # times are integer nanoseconds both ways

    def __init__(self, ns: Namespace, on_ready: Callable[[], None] | None = None) -> None:
        self.ns = ns
        self.on_ready = on_ready
        self._open: dict[int, View] = {}
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None and conn.capable & FUSE_CAP_POSIX_ACL:
            conn.want |= FUSE_CAP_POSIX_ACL
        if config is not None:
            config.use_ino = 1
            config.readdir_ino = 1
            config.kernel_cache = 1  # a snapshot's file never changes: keep its pages cached
            config.entry_timeout = ATTR_TIMEOUT
            config.attr_timeout = ATTR_TIMEOUT
            config.negative_timeout = ATTR_TIMEOUT
        if self.on_ready is not None:
            self.on_ready()

    def _guard(self, path: str, what: Callable[[], Any]) -> Any:
        try:
            return what()
        except DeltavaultError as exc:
            self.ns.problem(path, exc.message, "read")
            self.ns.stale()
            raise mfusepy.FuseOSError(errno.EIO) from exc

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        return self._guard(path, lambda: self.ns.attrs(self.ns.resolve(path)))  # type: ignore[no-any-return]

    def readdir(self, path: str, fh: int) -> list[Any]:
        def listing() -> list[Any]:
            item = self.ns.resolve(path)
            out: list[Any] = [(".", {"st_mode": 0o40555}, 0), ("..", {"st_mode": 0o40555}, 0)]
            for name, child in self.ns.children(item):
                a = self.ns.attrs(child)
                out.append((os.fsdecode(name), {"st_mode": a["st_mode"], "st_ino": a["st_ino"]}, 0))
            return out
        return self._guard(path, listing)  # type: ignore[no-any-return]

    def readlink(self, path: str) -> str:
        return os.fsdecode(self._guard(path, lambda: self.ns.readlink(self.ns.resolve(path))))

    def open(self, path: str, flags: int) -> int:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise mfusepy.FuseOSError(errno.EROFS)
        view = self._guard(path, lambda: self.ns.open(self.ns.resolve(path)))
        with self._lock:
            fh = next(self._numbers)
            self._open[fh] = view
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        view = self._open.get(fh)
        if view is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        return self._guard(path, lambda: view.read(offset, size))  # type: ignore[no-any-return]

    def lseek(self, path: str, offset: int, whence: int, fh: int) -> int:
        view = self._open.get(fh)
        if view is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise mfusepy.FuseOSError(errno.EINVAL)  # the kernel handles the others itself
        return self._guard(path, lambda: view.seek(offset, whence))  # type: ignore[no-any-return]

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            self._open.pop(fh, None)
        return 0

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        want = os.fsencode(name)
        for key, value in self._guard(path, lambda: self.ns.xattrs(self.ns.resolve(path))):
            if key == want:
                return value  # type: ignore[no-any-return]
        raise mfusepy.FuseOSError(errno.ENODATA)

    def listxattr(self, path: str) -> list[str]:
        return [os.fsdecode(k) for k, _v in self._guard(path, lambda: self.ns.xattrs(self.ns.resolve(path)))]

    def access(self, path: str, amode: int) -> int:
        if amode & os.W_OK:
            raise mfusepy.FuseOSError(errno.EROFS)
        self.getattr(path)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}


class Fuse(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy lists libfuse's lseek but has no wrapper for it; SEEK_DATA and SEEK_HOLE need it."""

    def lseek(self, path: bytes | None, offset: int, whence: int, fip: Any) -> int:
        fh = fip.contents.fh
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        return self.operations.lseek(decoded, offset, whence, fh)  # type: ignore[no-any-return]
