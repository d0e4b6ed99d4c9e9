"""Local catalog (SQLite, in the user's cache dir): the previous run's directory trees.

Rows are keyed by (source id, path relative to the snapshot root), never by device id or
mount point, so a snapshot mounted somewhere else still matches. Each row holds the tree
blob's plaintext, which carries size, mtime, ctime and inode of every entry plus its
content references: an incremental run compares against it and downloads nothing.

The catalog is a cache. Losing it costs speed (the previous snapshot's trees are read
instead), never correctness.

It is also input that decides what a backup records, so every row that carries trust is
checked before use, and one that fails is removed and counted (``rejected``; the run
reports them in one warning) and its files are compared with the previous snapshot or
read again:

- ``dirs`` and ``sources`` rows carry a keyed BLAKE3 tag (``RowAuth``) under a key derived
  from the repository's master key (``Repository.cache_key("catalog")``), binding every
  field: source id, path, tree id and tree bytes; snapshot id, run start (it sets the racy
  window) and the index files (they decide whether reused references skip index lookups).
- ``blobs`` rows (page digests) are content-addressed: their data must have the blob id,
  which is keyed for an encrypted repository.

An unencrypted repository has no secret, so its rows are not authenticated (a tag anyone
can compute would prove nothing): there the catalog is protected only by being private to
the user, a 0600 file in a 0700 directory that must be ours (fs.files). Blob rows are still
checked against their (then unkeyed) id, which catches damage.

Replay, an older but genuine catalog copied back, cannot make a backup record content a
file does not have: a reused entry must match the file's current size, mtime, ctime and
inode, and ctime cannot be set back by a user, so a match means the file has not changed
since that older run read it; the snapshot named must still exist; and the index files
named are compared with the live index, so reused references skip index lookups only if no
blob can have been removed since. Rows from different versions of one catalog can be mixed
the same way; the worst outcome is the racy-window check judged against a later run start,
which needs write access to the user's own private cache (the user could change the files
themselves).

The tree id of a ``dirs`` row is not required to be the blob id of its tree bytes: a clean
directory keeps its stored tree id while the row holds the entries as seen in this run
(atime of subdirectories and symlinks included), so the two legitimately differ. The tag
binds them instead.
"""

from __future__ import annotations

import hmac
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3
import msgspec

from deltavault.backup.files.catalog_files import prepare, remove_files
from deltavault.fs.dirfd import identity
from deltavault.fs.files import UnsafeCacheDir

SCHEMA = 5  # 5: authenticated rows (older catalogs are rebuilt)

_DDL = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS sources(
  source_id TEXT PRIMARY KEY, snapshot TEXT, run_start_ns INTEGER, updated REAL, index_files TEXT, mac BLOB);
CREATE TABLE IF NOT EXISTS dirs(
  source_id TEXT, path BLOB, tree_id BLOB, tree BLOB, mac BLOB,
  PRIMARY KEY(source_id, path)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs(
  source_id TEXT, id BLOB, data BLOB, PRIMARY KEY(source_id, id)) WITHOUT ROWID;
"""
_WHAT = {"sources": ("source record", "source records",
                     "this run compared with the previous snapshot's trees instead"),
         "dirs": ("directory", "directories", "the files in those directories were read again"),
         "blobs": ("page-digest block", "page-digest blocks", "the files they belong to were read in full")}


@dataclass(frozen=True)
class SourceState:
    snapshot: str
    run_start_ns: int
    index_files: frozenset[str]  # index files in force when the catalog was written


class RowAuth:
    """Keyed BLAKE3 tags over a row's fields (msgpack, so field boundaries are unambiguous;
    a large last field is hashed after its length, without a copy). ``key`` None: the
    repository is unencrypted and rows carry no tag (see the module doc)."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key

    def tag(self, table: str, fields: tuple[str | bytes | int, ...], tail: bytes = b"") -> bytes:
        if self.key is None:
            return b""
        h = blake3.blake3(msgspec.msgpack.encode([table, *fields, len(tail)]), key=self.key)
        h.update(tail)
        return h.digest()

    def ok(self, mac: object, table: str, fields: tuple[str | bytes | int, ...], tail: bytes = b"") -> bool:
        if self.key is None:
            return True
        return isinstance(mac, bytes) and hmac.compare_digest(mac, self.tag(table, fields, tail))


def open_catalog(path: Path, *, key: bytes | None,
                 blob_id: Callable[[bytes], bytes]) -> tuple[Catalog | None, str]:
    """(the catalog or None, a note when something was wrong). A damaged catalog file is
    removed and started afresh; one that cannot be written (a full disk) is not used.
    ``key``: Repository.cache_key("catalog"); ``blob_id``: the repository's blob ids."""
    try:
        return Catalog(path, key=key, blob_id=blob_id), ""
    except UnsafeCacheDir as exc:
        return None, f"the local catalog is not used: its directory {exc.path} {exc.why}"
    except (sqlite3.OperationalError, OSError) as exc:  # full disk, I/O error, locked: the file may be fine
        return None, f"the local catalog is unusable ({exc}); compared with the previous snapshot's trees instead"
    except sqlite3.DatabaseError as exc:  # not a database, malformed
        damage = str(exc)
    try:
        remove_files(path)
    except OSError as exc:
        return None, f"the local catalog is damaged ({damage}) and cannot be removed ({exc})"
    try:
        return Catalog(path, key=key, blob_id=blob_id), (
            f"the local catalog was damaged ({damage}); started a new one, and "
            "compared with the previous snapshot's trees this time")
    except (sqlite3.Error, OSError, UnsafeCacheDir) as exc:
        return None, f"the local catalog was damaged ({damage}) and a new one cannot be made ({exc})"


class Catalog:
    def __init__(self, path: Path, *, key: bytes | None, blob_id: Callable[[bytes], bytes]) -> None:
        self.path = path
        self.auth = RowAuth(key)
        self._blob_id = blob_id
        self.lock = threading.Lock()
        self.damaged = ""  # why a query failed on damaged data, if one did
        self.rejected: Counter[str] = Counter()  # rows that failed their check, by table
        dir_id, file_id, self.note = prepare(path)
        self.db = self._connect()
        try:
            # Only we can write the directory, so this holds by construction; it would catch
            # an ancestor of the cache root swapped between _prepare and the connect.
            if (identity(os.stat(path.parent)) != dir_id
                    or identity(os.stat(path, follow_symlinks=False)) != file_id):
                raise OSError(f"the catalog file {path} was replaced while it was opened")
        except BaseException:
            self.db.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA trusted_schema=OFF")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_DDL)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES('schema', ?)", (str(SCHEMA),))
            elif row[0] != str(SCHEMA):
                # A cache from another version: start over rather than misread it.
                db.executescript("DROP TABLE dirs; DROP TABLE sources; DROP TABLE blobs;")
                db.executescript(_DDL)
                db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA),))
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        self.db.close()

    def _fetch(self, sql: str, args: tuple[object, ...]) -> tuple[object, ...] | None:
        # A damaged page shows up only when a query reaches it: the entry is then unknown
        # (its file is read again) and the damage is remembered for the end of the run.
        try:
            with self.lock:
                row = self.db.execute(sql, args).fetchone()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise
            self.damaged = self.damaged or str(exc)
            return None
        return tuple(row) if row else None

    def _reject(self, table: str, sql: str, args: tuple[object, ...]) -> None:
        """Count a row that failed its check and remove it, so this run's commit replaces it
        and nothing reads it again."""
        self.rejected[table] += 1
        try:
            with self.lock:
                self.db.execute(sql, args)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                return  # a full disk: the row stays, and is refused again next time
            self.damaged = self.damaged or str(exc)

    def source_state(self, source_id: str) -> SourceState | None:
        row = self._fetch("SELECT snapshot, run_start_ns, index_files, mac FROM sources WHERE source_id=?",
                          (source_id,))
        if row is None:
            return None
        snapshot, start, files, mac = row
        if not (isinstance(snapshot, str) and isinstance(start, int) and isinstance(files, str)
                and self.auth.ok(mac, "sources", (source_id, snapshot, start, files))):
            self._reject("sources", "DELETE FROM sources WHERE source_id=?", (source_id,))
            return None
        return SourceState(snapshot, start, frozenset(files.split()))

    def get_dir(self, source_id: str, path: bytes) -> tuple[bytes, bytes] | None:
        row = self._fetch("SELECT tree_id, tree, mac FROM dirs WHERE source_id=? AND path=?", (source_id, path))
        if row is None:
            return None
        tree_id, tree, mac = row
        if not (isinstance(tree_id, bytes) and isinstance(tree, bytes)
                and self.auth.ok(mac, "dirs", (source_id, path, tree_id), tree)):
            self._reject("dirs", "DELETE FROM dirs WHERE source_id=? AND path=?", (source_id, path))
            return None
        return tree_id, tree

    def get_blob(self, source_id: str, blob_id: bytes) -> bytes | None:
        row = self._fetch("SELECT data FROM blobs WHERE source_id=? AND id=?", (source_id, blob_id))
        if row is None:
            return None
        data = row[0]
        if not isinstance(data, bytes) or self._blob_id(data) != blob_id:
            self._reject("blobs", "DELETE FROM blobs WHERE source_id=? AND id=?", (source_id, blob_id))
            return None
        return data

    def rejection_note(self) -> str:
        """One warning for every row that failed its check in this run, or ''."""
        if not self.rejected:
            return ""
        counts = [(t, n) for t in _WHAT if (n := self.rejected[t])]
        what = ", ".join(f"{n} {_WHAT[t][0] if n == 1 else _WHAT[t][1]}" for t, n in counts)
        then = "; ".join(_WHAT[t][2] for t, _n in counts)
        return (f"entries of the local catalog failed verification ({what}): something other than "
                f"deltavault changed it. They were not used ({then}) and were removed from it")

    def discard(self) -> None:
        """Close and delete the catalog files: the next run starts a new catalog."""
        self.close()
        remove_files(self.path)
