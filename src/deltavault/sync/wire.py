"""What a push sync sends about each entry (sync/push.py to sync/agent.py), as msgpack lists.

    [name, kind, mode, uid, gid, atime_ns, mtime_ns, size, rdev, extra, xattrs]

kind: "f" file (extra: GROUP when it has other links in SRC: the first name of a hard-link
group), "d" directory, "l" symlink (extra: its target), "h" a further name of a file
already sent (extra: the first name's path), "s" special (FIFO or device node).
xattrs: [[name, value], ...] when --acl or --xattrs is on, else None. Owners are numeric.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from deltavault.errors import CorruptionError
from deltavault.fs.paths import check_name
from deltavault.sync.options import SyncOptions

VERSION = 1
KINDS = ("f", "d", "l", "h", "s")
GROUP = b"L"  # the extra of a file that is the first name of a hard-link group (older agents ignore it)


def entry(name: bytes, kind: str, st: os.stat_result, *, extra: bytes | None = None,
          xattrs: list[tuple[bytes, bytes]] | None = None) -> list[Any]:
    return [name, kind, st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns,
            st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_rdev, extra,
            [list(x) for x in xattrs] if xattrs is not None else None]


def kind_of(st: os.stat_result) -> str | None:
    """The wire kind of a source entry; None for what is not copied (sockets, unknown types)."""
    m = st.st_mode
    if stat.S_ISREG(m):
        return "f"
    if stat.S_ISDIR(m):
        return "d"
    if stat.S_ISLNK(m):
        return "l"
    if stat.S_ISFIFO(m) or stat.S_ISCHR(m) or stat.S_ISBLK(m):
        return "s"
    return None


class Entry:
    """A received entry, checked: its name is one safe component and its fields have types."""

    __slots__ = ("extra", "kind", "name", "st", "xattrs")

    def __init__(self, raw: Any) -> None:
        try:
            name, kind, mode, uid, gid, atime, mtime, size, rdev, extra, xattrs = raw
            self.name = check_name(name)
            if kind not in KINDS or not all(isinstance(v, int) for v in (mode, uid, gid, atime, mtime, size, rdev)):
                raise ValueError
            if extra is not None and not isinstance(extra, bytes):
                raise ValueError
            self.kind: str = kind
            self.extra: bytes | None = extra
            self.xattrs: list[tuple[bytes, bytes]] | None = (
                None if xattrs is None else [(bytes(k), bytes(v)) for k, v in xattrs])
        except (ValueError, TypeError):
            raise CorruptionError(f"the sender sent a malformed entry: {raw!r:.200}") from None
        # A real stat_result, so the local engine's metadata helpers apply unchanged.
        self.st = os.stat_result((mode, 0, 0, 1, uid, gid, size, atime // 10**9, mtime // 10**9, 0,
                                  atime / 1e9, mtime / 1e9, 0.0, atime, mtime, 0, 4096, 0, rdev))


_OPTIONS = ("delete", "checksum", "skip_empty_dirs", "acl", "xattrs", "owner", "excludes", "includes",
            "default_excludes", "verify", "stop_on_error", "delta", "delta_min", "bufsize")


def options_wire(opts: SyncOptions) -> dict[str, Any]:
    return {k: getattr(opts, k) for k in _OPTIONS}


def options_from(raw: dict[str, Any]) -> SyncOptions:
    return SyncOptions(**{k: raw[k] for k in _OPTIONS if k in raw})
