"""NTFS file systems for tests: an image file made by mkntfs, mounted with ntfs-3g, and
reading ntfs-3g's metadata back through getfattr."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NAMES = ("system.ntfs_acl", "system.ntfs_attrib", "system.ntfs_reparse_data")
TIMES = "system.ntfs_times"


@contextmanager
def ntfs(tmp_path: Path, name: str, streams: str | None = "windows", size: str = "64M",
         options: str = "") -> Iterator[Path]:
    """A fresh NTFS image ``name``.img mounted with ntfs-3g at tmp_path/name (again, if
    it exists), with ``streams_interface=streams`` and ``options``."""
    img, mnt = tmp_path / f"{name}.img", tmp_path / name
    if not img.exists():
        subprocess.run(["truncate", "-s", size, str(img)], check=True)
        subprocess.run(["mkntfs", "-F", "-Q", "-q", str(img)], check=True, capture_output=True)
    mnt.mkdir(exist_ok=True)
    cmd = ["ntfs-3g", str(img), str(mnt)]
    opts = ",".join(o for o in (f"streams_interface={streams}" if streams else "", options) if o)
    if opts:
        cmd[1:1] = ["-o", opts]
    subprocess.run(cmd, check=True)
    try:
        yield mnt
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def getfattr(path: Path, name: str) -> str:
    """One attribute as getfattr shows it in hex (symlinks not followed), or its error."""
    r = subprocess.run(["getfattr", "--absolute-names", "-h", "-e", "hex", "-n", name, str(path)],
                       capture_output=True, text=True)
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 else f"error: {r.stderr.strip().split(': ')[-1]}"


def ntfs_view(root: Path, rel: str) -> dict[str, str]:
    """What getfattr shows of an entry's NTFS metadata; the times without the change time
    (the fourth), which NTFS sets itself, like ctime."""
    p = root / rel
    out = {n: getfattr(p, n) for n in NAMES}
    t = getfattr(p, TIMES)
    out[TIMES] = t[:-16] if not t.startswith("error") else t
    return out


def junction(path: Path, target: str) -> None:
    """Make the empty directory ``path`` a junction to ``target`` (a Windows path)."""
    t = ("\\??\\" + target).encode("utf-16-le")
    p = target.encode("utf-16-le")
    body = struct.pack("<HHHH", 0, len(t), len(t) + 2, len(p)) + t + b"\0\0" + p + b"\0\0"
    data = struct.pack("<IHH", 0xA0000003, len(body), 0) + body
    path.mkdir()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.setxattr(fd, "system.ntfs_reparse_data", data)
    finally:
        os.close(fd)


def streams_of(p: Path) -> dict[str, bytes]:
    """A file's or directory's named streams and their bytes, as ntfs-3g lists them."""
    names = [n.decode() for n in os.getxattr(p, "ntfs.streams.list").split(b"\0") if n]
    return {n: Path(f"{p}:{n}").read_bytes() for n in names}
