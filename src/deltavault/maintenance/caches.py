"""``cache``: the local caches under the cache root, one directory per repository id
(``~/.cache/deltavault/<id>``: index and snapshot copies, the catalog, copy maps): their
size and when they were last written, and removing those not used for a while."""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from deltavault.fs.files import UnsafeCacheDir, private_dir

_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class CacheDir:
    id: str  # the repository id
    path: Path
    size: int
    last_used: float  # newest modification time of anything in it (seconds)


def list_caches(root: Path) -> list[CacheDir]:
    """The repositories' cache directories under ``root`` (anything else there is not ours)."""
    out = []
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    for name in names:
        path = root / name
        if not _ID.match(name) or not stat.S_ISDIR(os.lstat(path).st_mode):
            continue
        size, newest = 0, os.lstat(path).st_mtime
        for dirpath, _dirs, files in os.walk(path):
            for f in files:
                try:
                    st = os.lstat(os.path.join(dirpath, f))
                except OSError:
                    continue
                size += st.st_size
                newest = max(newest, st.st_mtime)
        out.append(CacheDir(name, path, size, newest))
    return out


def remove_cache(root: Path, cache_id: str) -> None:
    """Remove one repository's cache, by fd from the (private) cache root: no symlink in it
    is followed."""
    if not _ID.match(cache_id):
        raise ValueError(f"not a cache id: {cache_id!r}")
    try:
        fd = private_dir(root, create=False)
    except (FileNotFoundError, UnsafeCacheDir):
        return
    try:
        shutil.rmtree(cache_id, dir_fd=fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def old_caches(caches: list[CacheDir], max_age_days: float, now: float | None = None) -> list[CacheDir]:
    limit = (now if now is not None else time.time()) - max_age_days * 86400
    return [c for c in caches if c.last_used < limit]
