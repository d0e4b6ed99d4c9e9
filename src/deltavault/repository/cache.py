"""The local cache of content-addressed repository objects (``index/``, ``snapshots/``).

Cached objects are named by the BLAKE3 of their bytes and checked against that name on
every read, and the directories are private (fs.files): another user can neither plant
nor read them. So an incremental run reads its index and snapshots from here and
downloads only what is new.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from deltavault.backends.base import Backend
from deltavault.errors import CorruptionError
from deltavault.fs.files import (
    read_cache_file,
    read_cache_files,
    remove_cache_file,
    remove_cache_files,
    write_cache_file,
)


def default_cache_root() -> Path:
    env = os.environ.get("DELTAVAULT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "deltavault" if xdg else Path.home() / ".cache" / "deltavault"


def _named_by_content(name: str, data: bytes) -> bool:
    return blake3.blake3(data).hexdigest() == name.rsplit("/", 1)[-1]


class ObjectCache:
    """``directory`` None: no cache, every object comes from the backend."""

    def __init__(self, backend: Backend, directory: Path | None) -> None:
        self.backend = backend
        self.dir = directory

    def _path(self, name: str) -> Path | None:
        folder, _, leaf = name.rpartition("/")
        if self.dir is None or not leaf or leaf in (".", "..") or "\0" in leaf:
            return None  # names come from the repository's listing: never a path of their own
        return self.dir / folder / leaf if folder else self.dir / leaf

    def _get(self, name: str) -> bytes | None:
        path = self._path(name)
        if path is None:
            return None
        data = read_cache_file(path)
        if data is None:
            return None
        if not _named_by_content(name, data):
            remove_cache_file(path)
            return None
        return data

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        if path is not None:
            write_cache_file(path, data)

    def fetch(self, name: str) -> bytes:
        """A content-addressed object, from the cache or else from the backend (then cached)."""
        data = self._get(name)
        if data is None:
            data = self.backend.get(name)
            if not _named_by_content(name, data):
                # The error's traceback keeps this frame: with the bytes in it, every damaged
                # object fetch_many returned as an error stayed in memory until the end
                # (ten snapshots of 60 MiB from a lying store: 600 MiB held).
                del data
                raise CorruptionError(f"{name}: content does not match its name (damaged)")
            self.put(name, data)
        return data

    def fetch_many(self, folder: str, leaves: Iterable[str], *,
                   on_error: type[Exception] | tuple[type[Exception], ...] = ()) -> dict[str, bytes | Exception]:
        """``fetch`` of the objects ``folder/leaf`` for many leaves at once, by leaf: the
        cached ones read through one opened directory, the others downloaded on a few
        threads (each a round trip on a remote backend) and cached. Each is checked against
        its name as ``fetch`` checks it. An error of the types ``on_error`` is returned in
        place of that object's bytes; any other is raised."""
        leaves = list(leaves)
        got: dict[str, bytes | Exception] = {}
        if self.dir is not None:
            safe = [leaf for leaf in leaves  # as _path judges a name, without a Path each
                    if leaf and leaf not in (".", "..") and "/" not in leaf and "\0" not in leaf]
            for leaf, data in read_cache_files(self.dir / folder, safe).items():
                if _named_by_content(f"{folder}/{leaf}", data):
                    got[leaf] = data
                else:
                    self.remove(f"{folder}/{leaf}")
        missing = [leaf for leaf in leaves if leaf not in got]

        def one(leaf: str) -> bytes | Exception:
            try:
                return self.fetch(f"{folder}/{leaf}")
            except on_error as exc:
                return exc

        if len(missing) > 4:
            with ThreadPoolExecutor(max_workers=8, thread_name_prefix="dv-fetch") as pool:
                got.update(zip(missing, pool.map(one, missing), strict=True))
        else:
            got.update((leaf, one(leaf)) for leaf in missing)
        return got

    def remove(self, name: str) -> None:
        path = self._path(name)
        if path is not None:
            remove_cache_file(path)

    def prune(self, folder: str, keep: set[str]) -> None:
        """Drop the cached objects of ``folder`` whose names are not in ``keep``."""
        if self.dir is None:
            return
        remove_cache_files(self.dir / folder, lambda leaf: f"{folder}/{leaf}" not in keep)
