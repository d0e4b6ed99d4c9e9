"""Which mounted file system holds a path (from /proc/self/mountinfo)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str  # device, e.g. /dev/mapper/vg-home
    root: str  # the path inside the file system that is mounted here (btrfs: the subvolume)
    options: str


def _unescape(s: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) + 1 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        r = right.split()
        if len(f) < 6 or len(r) < 2:
            continue
        mounts.append(Mount(_unescape(f[4]), r[0], _unescape(r[1]), _unescape(f[3]),
                            f[5] + ("," + r[2] if len(r) > 2 else "")))
    return mounts


def find_mount(path: str, mountinfo: str | None = None) -> Mount:
    """The mount whose mount point is the longest prefix of path's real path (last one wins,
    as later mounts hide earlier ones)."""
    real = os.path.realpath(path)
    if mountinfo is None:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mountinfo = f.read()
    best: Mount | None = None
    for m in parse_mountinfo(mountinfo):
        mp = m.mount_point
        inside = real == mp or real.startswith(mp.rstrip("/") + "/") or mp == "/"
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = m
    if best is None:
        raise FileNotFoundError(f"no mount holds {path}")
    return best
