"""A backup run's changes to the local catalog, committed in one transaction once the
snapshot is saved."""

from __future__ import annotations

import sqlite3
import threading

from deltavault.backup.files.catalog import Catalog

# A run's directory rows wait here until commit: on disk (SQLite's temporary file), not in
# memory, whatever the size of the tree.
_RUN_DDL = """
CREATE TEMP TABLE IF NOT EXISTS run_dirs(path BLOB PRIMARY KEY, tree_id BLOB, tree BLOB, mac BLOB);
CREATE TEMP TABLE IF NOT EXISTS run_seen(path BLOB PRIMARY KEY);
DELETE FROM temp.run_dirs;
DELETE FROM temp.run_seen;
"""
# Rows buffered before they are written to the temporary tables.
_FLUSH_ROWS = 1000
_FLUSH_BYTES = 8 << 20


class CatalogWriter:
    """A run's changes. Directory rows wait in temporary tables and reach the catalog in one
    transaction in ``commit``, once the snapshot is saved, so a failed run leaves the
    previous rows intact. Page-digest blobs (``put_blob``) are written at once, so a very
    large file's digests never pile up in memory: they are content-addressed and checked
    against their id when read, so a blob written by a run that then fails is harmless,
    and the next commit drops those no snapshot refers to. Thread-safe."""

    def __init__(self, catalog: Catalog, source_id: str) -> None:
        self.catalog = catalog
        self.source_id = source_id
        self._dirs: list[tuple[bytes, bytes, bytes, bytes]] = []
        self._dir_bytes = 0
        self._seen: list[bytes] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None  # the first failed write; commit raises it
        try:
            with catalog.lock:
                catalog.db.executescript(_RUN_DDL)
        except (sqlite3.Error, OSError) as exc:
            self._error = exc

    def _flush(self) -> None:
        """Write the buffered rows to the temporary tables (caller holds self._lock)."""
        if self._error is not None or not (self._dirs or self._seen):
            self._dirs.clear()
            self._seen.clear()
            return
        dirs, seen = self._dirs, self._seen
        self._dirs, self._seen, self._dir_bytes = [], [], 0
        cat = self.catalog
        try:
            with cat.lock:
                cat.db.executemany("INSERT OR REPLACE INTO temp.run_dirs VALUES(?,?,?,?)", dirs)
                cat.db.executemany("INSERT OR IGNORE INTO temp.run_seen VALUES(?)", [(p,) for p in seen])
        except (sqlite3.Error, OSError) as exc:
            self._error = exc

    def visit(self, path: bytes) -> None:
        with self._lock:
            self._seen.append(path)
            if len(self._seen) >= _FLUSH_ROWS:
                self._flush()

    def put_dir(self, path: bytes, tree_id: bytes, tree: bytes) -> None:
        mac = self.catalog.auth.tag("dirs", (self.source_id, path, tree_id), tree)
        with self._lock:
            self._dirs.append((path, tree_id, tree, mac))
            self._seen.append(path)
            self._dir_bytes += len(tree)
            if len(self._dirs) >= _FLUSH_ROWS or self._dir_bytes >= _FLUSH_BYTES:
                self._flush()

    def put_blob(self, blob_id: bytes, data: bytes) -> None:
        cat = self.catalog
        try:
            with cat.lock:
                # REPLACE: a row that failed its check must not survive under this id.
                cat.db.execute("INSERT OR REPLACE INTO blobs VALUES(?,?,?)", (self.source_id, blob_id, data))
        except (sqlite3.Error, OSError) as exc:
            with self._lock:
                self._error = self._error or exc

    def commit(self, snapshot_id: str, run_start_ns: int, *, keep_blobs: set[bytes],
               index_files: set[str]) -> None:
        """``keep_blobs``: every META blob the new snapshot refers to; others are dropped.
        Raises the first write that failed during the run, leaving the catalog as it was."""
        with self._lock:
            self._flush()
            if self._error is not None:
                raise self._error
        cat = self.catalog
        sid = self.source_id
        files = " ".join(sorted(index_files))
        mac = cat.auth.tag("sources", (sid, snapshot_id, run_start_ns, files))
        with cat.lock:
            db = cat.db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT OR REPLACE INTO dirs SELECT ?, path, tree_id, tree, mac FROM temp.run_dirs",
                           (sid,))
                db.execute("DELETE FROM dirs WHERE source_id=? AND path NOT IN (SELECT path FROM temp.run_seen)",
                           (sid,))
                rows = db.execute("SELECT id FROM blobs WHERE source_id=?", (sid,)).fetchall()
                drop = [(sid, r[0]) for r in rows if not (isinstance(r[0], bytes) and r[0] in keep_blobs)]
                db.executemany("DELETE FROM blobs WHERE source_id=? AND id=?", drop)
                db.execute("INSERT OR REPLACE INTO sources VALUES(?,?,?,strftime('%s','now'),?,?)",
                           (sid, snapshot_id, run_start_ns, files, mac))
                db.execute("COMMIT")
            except BaseException:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back (a full disk or I/O error does that)
                raise
            db.executescript("DELETE FROM temp.run_dirs; DELETE FROM temp.run_seen;")
