"""Small file helpers."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_cache_file(path: Path, data: bytes) -> bool:
    """Write a local cache file atomically (temp name, then rename); best effort: a cache
    only saves downloads, so a failure is not an error. Returns whether it was written."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()  # a full cache disk must not keep the partial file
        except OSError:
            pass
        return False
    return True
