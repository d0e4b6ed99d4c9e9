"""inotify over every directory of a tree: which entries just appeared in it. The hostile
user (hostile.py) reacts to each new entry the moment it appears, as a real attacker
racing a privileged writer would."""

from __future__ import annotations

import ctypes
import os
import select
import struct

_IN_MOVED_TO, _IN_CREATE, _IN_ISDIR = 0x80, 0x100, 0x40000000
_IN_DONT_FOLLOW, _IN_ONLYDIR = 0x02000000, 0x01000000
_EVENT = struct.Struct("iIII")


class Watcher:
    """inotify on every directory of a tree we may read: which entries just appeared."""

    def __init__(self, root: bytes) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._dirs: dict[int, bytes] = {}
        self.add_tree(root)

    def add(self, path: bytes) -> None:
        wd = self._libc.inotify_add_watch(self.fd, path, _IN_CREATE | _IN_MOVED_TO | _IN_DONT_FOLLOW | _IN_ONLYDIR)
        if wd >= 0:
            self._dirs[wd] = path

    def add_tree(self, root: bytes) -> None:
        for dirpath, _dirs, _files in os.walk(root):
            self.add(dirpath)

    def events(self, timeout: float, stop: int) -> list[tuple[bytes, bool]] | None:
        """(path, is a directory) of the entries that appeared, waiting up to ``timeout``;
        None once ``stop`` (a pipe's read end) is readable: its writer closed it."""
        ready = select.select([self.fd, stop], [], [], timeout)[0]
        if stop in ready:
            return None
        if not ready:
            return []
        try:
            buf = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out: list[tuple[bytes, bool]] = []
        pos = 0
        while pos + _EVENT.size <= len(buf):
            wd, mask, _cookie, ln = _EVENT.unpack_from(buf, pos)
            name = buf[pos + _EVENT.size:pos + _EVENT.size + ln].rstrip(b"\0")
            pos += _EVENT.size + ln
            parent = self._dirs.get(wd)
            if parent is not None and name:
                out.append((os.path.join(parent, name), bool(mask & _IN_ISDIR)))
        return out
