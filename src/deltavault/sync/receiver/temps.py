"""Temp names in DST. Everything a sync writes is made under a temp name in its final
directory and renamed into place when complete; the names are registered before they
are created, so that an interrupt at any point (Ctrl-C lands between any two statements)
cannot leave one behind."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from deltavault.fs.dirfd import Identity, Replaced, identity, new_entry_owner, open_dir_path

TEMP_PREFIX = b".dv-sync-"

Where = tuple[bytes, Identity | None]  # a DST directory: its path, and its identity if known


def temp_name(name: bytes) -> bytes:
    return TEMP_PREFIX + os.urandom(6).hex().encode() + b"." + name[:200]


def aside_name(name: bytes) -> bytes:
    """Where a file that failed --verify is kept for inspection."""
    return name[:200] + b".dv-verify-failed-" + os.urandom(3).hex().encode()


def unlink_quiet(dir_fd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


class Temps:
    """The temp names in use (thread-safe), by DST directory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: set[tuple[bytes, Identity | None, bytes]] = set()
        self._owners: dict[int, int] = {}  # st_dev -> the owner its file system gives our new entries

    def new(self, where: Where, name: bytes) -> bytes:
        """A temp name for ``name`` in the DST directory ``where``, registered."""
        tmp = temp_name(name)
        with self._lock:
            self._names.add((where[0], where[1], tmp))
        return tmp

    def done(self, where: Where, tmp: bytes) -> None:
        """``tmp`` was renamed into place, or removed."""
        with self._lock:
            self._names.discard((where[0], where[1], tmp))

    @contextmanager
    def made(self, where: Where, dfd: int, name: bytes) -> Iterator[bytes]:
        """A registered temp name for ``name`` in the directory ``dfd`` (``where``), for a
        block that creates it and renames it into place: if the block fails, whatever it
        made under that name is removed, unless the name no longer names it (``Replaced``:
        another user swapped the entry; what they put under either name is left alone)."""
        tmp = self.new(where, name)
        try:
            yield tmp
        except Replaced:
            self.done(where, tmp)
            raise
        except BaseException:
            unlink_quiet(dfd, tmp)
            self.done(where, tmp)
            raise
        self.done(where, tmp)

    def owner_probe(self, where: Where, dfd: int) -> Callable[[], int]:
        """For ``created_handle``/``created_dir``: the owner the file system gives an entry
        we make in ``dfd`` (``where``), found when asked with a probe file under a
        registered temp name (an interrupt cannot leave it behind). Asked only where an
        entry's owner is not ours; once per file system (it is the mount's: ntfs-3g
        ``uid=``, NFS root squash), not once per entry there."""
        def probe() -> int:
            dev = os.fstat(dfd).st_dev
            with self._lock:
                known = self._owners.get(dev)
            if known is not None:
                return known
            with self.made(where, dfd, b"owner") as name:
                uid = new_entry_owner(dfd, name)
            with self._lock:
                self._owners[dev] = uid
            return uid
        return probe

    def remove_all(self, root: int) -> None:
        """Remove what is left (an interrupted run). Each directory is found again from DST's
        root ``root``, by fd, and checked."""
        with self._lock:
            names, self._names = self._names, set()
        for rel, ident, tmp in names:
            try:
                fd = open_dir_path(root, rel)
            except OSError:
                continue
            try:
                if ident is None or identity(os.fstat(fd)) == ident:
                    unlink_quiet(fd, tmp)
            finally:
                os.close(fd)
