"""The key file that opened a repository last, kept in the local cache under a name taken
from the repository's location, so that the next command starts the key derivation (scrypt,
about 0.1 s of CPU, run without the GIL) while it imports its store's client and reads the
config and key files, instead of after them (issue #17: the start of an S3 restore).

It is only a hint: what it derives is used for the store's key file with the same bytes,
which gives the same key, and for no other. A stale or planted copy costs one derivation in
the background and is trusted for nothing; the cache directory is checked as ours
(fs.files) like every other cache file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import blake3

from deltavault.errors import DeltavaultError
from deltavault.fs.files import open_cache, read_cache_file, write_cache_file
from deltavault.repository import keys as keymod

HINTS = "key-hints"  # under the cache root, beside the repositories' <id> directories


class KeyHint:
    def __init__(self, root: Path, location: str) -> None:
        self._root = root
        self._name = blake3.blake3(location.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        self._path: Path | None = None  # once the directory is known to be ours alone
        self._data: bytes | None = None  # the copy read at start, if it parsed
        self._thread: threading.Thread | None = None
        self._result: keymod.MasterKey | BaseException | None = None
        self._opened: dict[str, bytes] = {}  # key file name -> bytes, of those unwrap opened

    def start(self, password: Callable[[], bytes]) -> None:
        """Begin deriving the key of the kept copy, if there is one."""
        where, _why = open_cache(self._root, HINTS)  # an unsafe root: the repository's cache says so
        if where is None:
            return
        self._path = where / self._name
        data = read_cache_file(self._path)
        if data is None:
            return
        try:
            kf = keymod.parse_key_file(data)
            pw = password()
        except DeltavaultError:
            return  # a damaged copy, or no password to be had yet: the open asks when it must
        self._data = data
        self._thread = threading.Thread(target=self._derive, args=(kf, pw), name="dv-key", daemon=True)
        self._thread.start()

    def _derive(self, kf: keymod.KeyFile, password: bytes) -> None:
        try:
            self._result = keymod.unwrap(kf, password)
        except BaseException as exc:  # handed to the open, which meets it as its own
            self._result = exc

    def unwrap(self, data: bytes, name: str, password: bytes) -> keymod.MasterKey:
        """The master key of the store's key file ``data`` (named ``name``): the one derived
        ahead when the kept copy is these very bytes, else derived now."""
        if self._thread is not None and data == self._data:
            self._thread.join()
            if isinstance(self._result, BaseException):
                raise self._result
            assert self._result is not None
            master = self._result
        else:
            master = keymod.unwrap(keymod.parse_key_file(data, name), password)
        self._opened[name] = data
        return master

    def keep(self, name: str | None) -> None:
        """The key file ``name`` opened the repository: keep a copy of it for the next run,
        unless the copy is already that. A cache that cannot be written is no error."""
        data = self._opened.get(name) if name is not None else None
        if self._path is None or data is None or data == self._data:
            return
        write_cache_file(self._path, data)
