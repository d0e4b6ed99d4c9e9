"""Local catalog (SQLite, in the user's cache dir): the previous run's directory trees.

Rows are keyed by (source id, path relative to the snapshot root), never by device id or
mount point, so a snapshot mounted somewhere else still matches. Each row holds the tree
blob's plaintext, which carries size, mtime, ctime and inode of every entry plus its
content references: an incremental run compares against it and downloads nothing.

The catalog is a cache. Losing it costs speed (the previous snapshot's trees are read
instead), never correctness: every reused reference is checked against the index.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEMA = 4

_DDL = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS sources(
  source_id TEXT PRIMARY KEY, snapshot TEXT, run_start_ns INTEGER, updated REAL, index_files TEXT);
CREATE TABLE IF NOT EXISTS dirs(
  source_id TEXT, path BLOB, tree_id BLOB, tree BLOB,
  PRIMARY KEY(source_id, path)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs(
  source_id TEXT, id BLOB, data BLOB, PRIMARY KEY(source_id, id)) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class SourceState:
    snapshot: str
    run_start_ns: int
    index_files: frozenset[str]  # index files in force when the catalog was written


def _remove_files(path: Path) -> None:
    """Delete a catalog with its WAL and shared-memory files."""
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass


def open_catalog(path: Path) -> tuple[Catalog | None, str]:
    """(the catalog or None, a note when something was wrong). A damaged catalog file is
    removed and started afresh; one that cannot be written (a full disk) is not used."""
    try:
        return Catalog(path), ""
    except (sqlite3.OperationalError, OSError) as exc:  # full disk, I/O error, locked: the file may be fine
        return None, f"the local catalog is unusable ({exc}); compared with the previous snapshot's trees instead"
    except sqlite3.DatabaseError as exc:  # not a database, malformed
        damage = str(exc)
    try:
        _remove_files(path)
    except OSError as exc:
        return None, f"the local catalog is damaged ({damage}) and cannot be removed ({exc})"
    try:
        return Catalog(path), (f"the local catalog was damaged ({damage}); started a new one, and "
                               "compared with the previous snapshot's trees this time")
    except (sqlite3.Error, OSError) as exc:
        return None, f"the local catalog was damaged ({damage}) and a new one cannot be made ({exc})"


class Catalog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._connect()
        self._lock = threading.Lock()
        self.damaged = ""  # why a query failed on damaged data, if one did

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
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
        return db

    def close(self) -> None:
        self._db.close()

    def source_state(self, source_id: str) -> SourceState | None:
        with self._lock:
            row = self._db.execute("SELECT snapshot, run_start_ns, index_files FROM sources WHERE source_id=?",
                                   (source_id,)).fetchone()
        if not row:
            return None
        return SourceState(row[0], row[1], frozenset((row[2] or "").split()))

    def _row(self, sql: str, args: tuple[object, ...]) -> tuple[bytes, ...] | None:
        # A damaged page shows up only when a query reaches it: the entry is then unknown
        # (its file is read again) and the damage is remembered for the end of the run.
        try:
            with self._lock:
                row = self._db.execute(sql, args).fetchone()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise
            self.damaged = self.damaged or str(exc)
            return None
        return tuple(bytes(v) for v in row) if row else None

    def get_dir(self, source_id: str, path: bytes) -> tuple[bytes, bytes] | None:
        row = self._row("SELECT tree_id, tree FROM dirs WHERE source_id=? AND path=?", (source_id, path))
        return (row[0], row[1]) if row else None

    def get_blob(self, source_id: str, blob_id: bytes) -> bytes | None:
        row = self._row("SELECT data FROM blobs WHERE source_id=? AND id=?", (source_id, blob_id))
        return row[0] if row else None

    def discard(self) -> None:
        """Close and delete the catalog files: the next run starts a new catalog."""
        self.close()
        _remove_files(self.path)

    def writer(self, source_id: str) -> CatalogWriter:
        return CatalogWriter(self, source_id)


class CatalogWriter:
    """Collects a run's changes; ``commit`` applies them in one transaction once the
    snapshot is saved, so a failed run leaves the previous catalog intact."""

    def __init__(self, catalog: Catalog, source_id: str) -> None:
        self.catalog = catalog
        self.source_id = source_id
        self._dirs: dict[bytes, tuple[bytes, bytes]] = {}
        self._blobs: dict[bytes, bytes] = {}
        self._visited: set[bytes] = set()
        self._lock = threading.Lock()

    def visit(self, path: bytes) -> None:
        self._visited.add(path)

    def put_dir(self, path: bytes, tree_id: bytes, tree: bytes) -> None:
        with self._lock:
            self._dirs[path] = (tree_id, tree)
            self._visited.add(path)

    def put_blob(self, blob_id: bytes, data: bytes) -> None:
        with self._lock:
            self._blobs[blob_id] = data

    def commit(self, snapshot_id: str, run_start_ns: int, *, keep_blobs: set[bytes],
               index_files: set[str]) -> None:
        """``keep_blobs``: every META blob the new snapshot refers to; others are dropped."""
        cat = self.catalog
        with cat._lock:
            db = cat._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR REPLACE INTO dirs VALUES(?,?,?,?)",
                               [(self.source_id, p, t, d) for p, (t, d) in self._dirs.items()])
                db.executemany("INSERT OR IGNORE INTO blobs VALUES(?,?,?)",
                               [(self.source_id, k, v) for k, v in self._blobs.items()])
                db.execute("CREATE TEMP TABLE IF NOT EXISTS seen(path BLOB PRIMARY KEY)")
                db.execute("DELETE FROM seen")
                db.executemany("INSERT OR IGNORE INTO seen VALUES(?)", [(p,) for p in self._visited])
                db.execute("DELETE FROM dirs WHERE source_id=? AND path NOT IN (SELECT path FROM seen)",
                           (self.source_id,))
                rows = db.execute("SELECT id FROM blobs WHERE source_id=?", (self.source_id,)).fetchall()
                drop = [(self.source_id, r[0]) for r in rows if bytes(r[0]) not in keep_blobs]
                db.executemany("DELETE FROM blobs WHERE source_id=? AND id=?", drop)
                db.execute("INSERT OR REPLACE INTO sources VALUES(?,?,?,strftime('%s','now'),?)",
                           (self.source_id, snapshot_id, run_start_ns, " ".join(sorted(index_files))))
                db.execute("COMMIT")
            except BaseException:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back (a full disk or I/O error does that)
                raise
