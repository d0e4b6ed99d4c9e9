"""The private directory of a qemu-nbd's socket, and those a killed run left behind.

Each is made in the temporary directory (``TMPDIR``), 0700, named ``dv-nbd-PID-START-NS-XXXX``:
the pid and start time (clock ticks) of the run that made it, and its pid namespace (the
inode of /proc/self/ns/pid). A run that is SIGKILLed
cannot remove its own (its qemu-nbd dies with it: qemuproc.py), so each run that starts a
qemu-nbd first removes those whose run is gone. Only this user's directories are touched:
the owner is checked on the entry itself (no symlink followed), it is opened by fd
relative to the temporary directory and checked to be the entry seen, and emptied only of
what qemu-nbd leaves (a socket: no directories). Names of another pid namespace (a
container sharing TMPDIR: its pid names another process here), or without one (older
versions made them) are left alone: nothing tells whether their run still lives.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile

from deltavault.fs.dirfd import identity, open_dir_checked
from deltavault.platform import proc_start, process_alive

PREFIX = "dv-nbd-"
_NAME = re.compile(PREFIX + r"(\d+)-(\d+)-(\d+)-[A-Za-z0-9_]+\Z")


def _pid_namespace() -> int:
    """Our pid namespace's inode (0 if unknown): a pid means a process only within it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def make_dir() -> str:
    """A new socket directory of this run (mkdtemp: 0700, a random name)."""
    pid = os.getpid()
    return tempfile.mkdtemp(prefix=f"{PREFIX}{pid}-{proc_start(pid)}-{_pid_namespace()}-")


def sweep_stale() -> list[str]:
    """Remove the socket directories of runs that are gone; their names."""
    try:
        tmp = os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return []
    removed, ns = [], _pid_namespace()
    try:
        for name in os.listdir(tmp):
            m = _NAME.match(name)
            if m and ns and int(m[3]) == ns and not process_alive(int(m[1]), int(m[2])):
                with contextlib.suppress(OSError):  # raced, replaced or not ours: left alone
                    if _remove(tmp, name):
                        removed.append(name)
    finally:
        os.close(tmp)
    return removed


def _remove(tmp: int, name: str) -> bool:
    st = os.stat(name, dir_fd=tmp, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return False
    fd = open_dir_checked(tmp, os.fsencode(name), identity(st))
    try:
        entries = os.listdir(fd)
        if any(stat.S_ISDIR(os.stat(e, dir_fd=fd, follow_symlinks=False).st_mode) for e in entries):
            return False  # not what a qemu-nbd leaves
        for entry in entries:
            os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=tmp)
    return True
