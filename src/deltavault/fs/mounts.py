"""Which mounted file system holds a path or a device (from /proc/self/mountinfo), which
btrfs subvolume holds a path, and every directory a directory lies in, through mount points
and bind mounts (``lineage``, for sync's overlap guard).

Point-in-time snapshots (snapshot/), volume change sources (tracking/volume/) and restore ask here."""

from __future__ import annotations

import os
from dataclasses import dataclass

from deltavault.fs.dirfd import DIR_FLAGS, Identity, identity, mount_id, open_dir_path


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str  # device, e.g. /dev/mapper/vg-home
    root: str  # the path inside the file system that is mounted here (btrfs: the subvolume)
    options: str
    device: str = ""  # major:minor of the mounted device
    writable: bool = True  # mounted read-write (this mount's own options)
    mount_id: int = 0  # the mnt_id that fs.dirfd.mount_id gives for an fd on it


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
                            f[5] + ("," + r[2] if len(r) > 2 else ""), f[2], "rw" in f[5].split(","),
                            int(f[0])))
    return mounts


def read_mountinfo() -> str:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def device_mounts(devices: set[str], mountinfo: str | None = None) -> list[Mount]:
    """The mounts of any of ``devices`` (major:minor), in mountinfo order."""
    return [m for m in parse_mountinfo(read_mountinfo() if mountinfo is None else mountinfo)
            if m.device in devices]


def find_mount(path: str, mountinfo: str | None = None) -> Mount:
    """The mount whose mount point is the longest prefix of path's real path (last one wins,
    as later mounts hide earlier ones)."""
    real = os.path.realpath(path)
    if mountinfo is None:
        mountinfo = read_mountinfo()
    best: Mount | None = None
    for m in parse_mountinfo(mountinfo):
        mp = m.mount_point
        inside = real == mp or real.startswith(mp.rstrip("/") + "/") or mp == "/"
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = m
    if best is None:
        raise FileNotFoundError(f"no mount holds {path}")
    return best


# btrfs snapshots deltavault takes (of a source for backup and sync, of an image's
# subvolume as a volume checkpoint) go into this folder of the subvolume.
SNAPSHOT_DIR = ".deltavault-snapshots"
SUBVOL_ROOT_INO = 256  # BTRFS_FIRST_FREE_OBJECTID: every subvolume's root directory


def subvolume_root(path: str, mount_point: str | None = None) -> str:
    """The nearest directory at or above path that is a btrfs subvolume root (a mount point
    counts as one: its parent lies on another device)."""
    cur = os.path.realpath(path)
    if not os.path.isdir(cur):
        cur = os.path.dirname(cur)
    dev = os.stat(cur).st_dev
    while True:
        st = os.stat(cur)
        if st.st_ino == SUBVOL_ROOT_INO or cur == mount_point or st.st_dev != dev:
            return cur
        parent = os.path.dirname(cur)
        if parent == cur:
            return cur
        if os.stat(parent).st_dev != dev:
            return cur  # parent is another subvolume (or file system): cur is a root
        cur = parent


# ---------------------------------------------------------------------------- lineage

def _below(root: bytes, inner: bytes) -> bytes | None:
    """``inner`` relative to ``root`` when inner lies strictly below it (file-system paths)."""
    if root == b"/":
        return inner[1:] if inner != b"/" else None
    return inner[len(root) + 1:] if inner.startswith(root + b"/") else None


def _other_views(mounts: dict[int, Mount], mid: int, ident: Identity) -> list[int]:
    """The directory ``ident``, root of the bind mount ``mid``, opened through each other
    mount of the same file system that shows it below its own root. From there ".." leads
    to its real parent in that file system, which ".." from the bind mount never reaches."""
    m = mounts.get(mid)
    if m is None or m.root == "/":
        return []
    out: list[int] = []
    for other in mounts.values():
        rest = (_below(os.fsencode(other.root), os.fsencode(m.root))
                if other.mount_id != mid and other.device == m.device else None)
        if rest is None:
            continue
        try:
            top = os.open(os.fsencode(other.mount_point), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if mount_id(top) != other.mount_id:  # hidden under another mount
                continue
            fd = open_dir_path(top, rest)
        except OSError:
            continue
        finally:
            os.close(top)
        if identity(os.fstat(fd)) == ident:
            out.append(fd)
        else:
            os.close(fd)
    return out


def lineage(dir_fd: int, *, mounts: bool = True) -> set[Identity]:
    """Identities of ``dir_fd`` and of every directory it lies in: up through ".." (with
    ``mounts``, on through each mount point to the root), and, where a directory is the
    root of a bind mount, also up through its real parents in its file system, found
    through the other mounts that show them. So a directory seen through a bind mount is
    known to lie inside its original's parents, which ``ancestors`` cannot tell.
    ``mounts=False``: only the file-system ancestry (a mount root inside a tree: does it
    show a part of that tree?)."""
    table: dict[int, Mount] | None = None
    seen: set[tuple[int, Identity]] = set()
    out: set[Identity] = set()
    todo = [os.dup(dir_fd)]
    while todo:
        fd = todo.pop()
        try:
            mid = mount_id(fd)
            while True:
                ident = identity(os.fstat(fd))
                out.add(ident)
                parent = os.open(b"..", DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = parent  # (closed by the finally, whatever fails next)
                pmid = mount_id(fd)
                top = identity(os.fstat(fd)) == ident
                if (top or pmid != mid) and (mid, ident) not in seen:  # ident is a mount's root
                    seen.add((mid, ident))
                    table = table if table is not None else {x.mount_id: x for x in parse_mountinfo(read_mountinfo())}
                    todo.extend(_other_views(table, mid, ident))
                if top or (pmid != mid and not mounts):
                    break
                mid = pmid
        finally:
            os.close(fd)
    return out
