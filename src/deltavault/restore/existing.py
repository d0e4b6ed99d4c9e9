"""What a file restore does with what is already in its target: ``--overwrite`` (whether
an existing entry is replaced) and ``--delete`` (entries the snapshot does not have are
removed). Both work by name in a directory the restore holds open, never following a
symlink; a directory is removed with ``shutil.rmtree(dir_fd=...)``, which walks by fd too."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from deltavault.fs.dirfd import lstat_at
from deltavault.fs.remove import remove_entry
from deltavault.model.nodes import Node, NodeType
from deltavault.restore.target import TEMP_PREFIX

OVERWRITE = ("always", "if-changed", "if-newer", "never")


def keep_existing(policy: str, st: os.stat_result | None, node: Node, owner: int) -> bool:
    """Leave the existing entry ``st`` where ``node`` (not a directory) would go?
    always: never kept; never: always kept; if-newer: kept unless the snapshot's is newer;
    if-changed: a regular file of the same size and modification time is kept (as restic
    assumes, such a file is already what the snapshot holds). Both only for an entry owned
    by ``owner``, the user the restore would make it belong to: anyone who can write in the
    target can forge a size and a time (utime) on a file of their own, but cannot give a file
    away, so a file another user planted is replaced, never kept as the snapshot's."""
    if st is None or stat.S_ISDIR(st.st_mode) or policy == "always":
        return False
    if policy == "never":
        return True
    if st.st_uid != owner:
        return False
    if policy == "if-newer":
        return node.mtime <= st.st_mtime_ns
    return (node.type == NodeType.FILE and stat.S_ISREG(st.st_mode) and st.st_size == node.size
            and st.st_mtime_ns == node.mtime)


def restored_owner(node: Node, owner: bool) -> int:
    """The user a restore makes ``node`` belong to: its own as root with owners restored,
    else whoever restores."""
    euid = os.geteuid()
    return node.uid if owner and euid == 0 else euid


def existing_entry(dir_fd: int, name: bytes) -> os.stat_result | None:
    return lstat_at(dir_fd, name)


def extras(dir_fd: int, nodes: list[Node], keep: Callable[[bytes], bool]) -> list[bytes]:
    """Names in the directory ``dir_fd`` that the snapshot's ``nodes`` do not have and
    ``keep`` does not protect (excluded from the restore), ours in-flight temp names aside."""
    wanted = {n.name for n in nodes}
    return sorted(n for n in (os.fsencode(x) for x in os.listdir(dir_fd))
                  if n not in wanted and not n.startswith(TEMP_PREFIX) and not keep(n))


def remove(dir_fd: int, name: bytes) -> None:
    """Remove ``name`` from ``dir_fd``: a directory with everything in it, by fd."""
    if lstat_at(dir_fd, name) is None:
        return
    remove_entry(dir_fd, name, name, lambda _rel, _st: None)
