"""Regular files in a file backup: reused when the previous run's entry still matches,
read otherwise (again if they change while being read), hard links stored once.

Files are opened through an O_PATH handle checked to be a regular file: opening whatever
was swapped in under the name between its stat and its open could block (a FIFO) or act
(a device: a tape rewinds, a watchdog arms), and O_PATH opens nothing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import msgspec

from deltavault.backup.files.catalog_writer import CatalogWriter
from deltavault.backup.files.content import ContentReader
from deltavault.backup.files.delta import PrevContent
from deltavault.backup.files.dirs import Child
from deltavault.backup.files.fileio import FileChanged
from deltavault.backup.files.nodes import bounded_xattrs, make_node
from deltavault.backup.files.ntfsmeta import NtfsEntries
from deltavault.backup.files.options import FileBackupOptions, RunLog, Store
from deltavault.backup.files.pending import PendingContent
from deltavault.backup.files.previous import PreviousState
from deltavault.chunking.cdc import Chunker
from deltavault.chunking.pages import segment_count
from deltavault.fs.dirfd import NotRegular, open_regular
from deltavault.model.content import ref_blob_ids
from deltavault.model.nodes import Node, NodeType
from deltavault.model.types import BlobType
from deltavault.workers import Inflight

READ_ATTEMPTS = 3


class RegularFiles:
    """``page_blob_ids`` collects the page-digest blobs of the files reused (the catalog keeps
    those); ``pool`` hashes, compresses, encrypts and stores the chunks."""

    def __init__(self, store: Store, previous: PreviousState, log: RunLog, options: FileBackupOptions,
                 pool: ThreadPoolExecutor, chunker: Chunker, *, workers: int, page_key: bytes | None,
                 catalog: CatalogWriter | None, page_blob_ids: set[bytes]) -> None:
        self.store = store
        self.previous = previous
        self.log = log
        self.opts = options
        self.catalog = catalog
        self.page_blob_ids = page_blob_ids
        self.content = ContentReader(store, pool, chunker, page_key=page_key,
                                     delta_threshold=options.delta_threshold,
                                     inflight=Inflight(options.buffer_memory),
                                     save_pages=self._save_page_segment)
        self._hardlinks: dict[tuple[int, int], Child] = {}
        self._racy_before = previous.run_start_ns - options.racy_window_ns if previous.run_start_ns else -1
        self._zero_segment_id: bytes | None = None
        self.ntfs: NtfsEntries | None = None  # the source being walked is on ntfs-3g

    def entry(self, dir_fd: int, fsname: bytes, name: bytes, path: bytes, st: os.stat_result,
              prev: Node | None) -> Child | None:
        """The regular file ``fsname`` of ``dir_fd`` (``st``: its lstat), stored under ``name``."""
        stats = self.log.stats
        hl_key = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
        if hl_key is not None and hl_key in self._hardlinks:
            first = self._hardlinks[hl_key]
            node = msgspec.structs.replace(first.node, name=name)
            clean = first.clean and prev is not None and node == prev
            self._tell(path, "U" if clean else "A" if prev is None else "M")
            return Child(node, clean, content=first.content, streams=first.streams)
        stats.bytes_total += st.st_size
        if self._reusable(prev, st) and (self.ntfs is None or prev is None
                                         or self.ntfs.same_streams(dir_fd, fsname, st, prev)):
            assert prev is not None
            node = prev if not hl_key else msgspec.structs.replace(prev, dev=st.st_dev, links=st.st_nlink)
            stats.files_unmodified += 1
            if prev.win is not None:  # its named streams (NTFS)
                stats.bytes_total += sum(s.size for s in prev.win.streams)
            self._tell(path, "U")
            self.log.reporter.advance(nbytes=st.st_size, items=1)
            if prev.pages:
                self.page_blob_ids.update(prev.pages)
                self._remember_pages(prev.pages)
            child: Child | None = Child(node, node is prev or node == prev)
        else:
            child = self._read(dir_fd, fsname, name, path, st, prev)
            if child is not None and child.content is not None and self._racy(prev, st):
                # Read again only because its stat data is too recent to prove it unchanged:
                # counted once its content is known (settle_racy), as unmodified if it is the same.
                assert prev is not None
                child.racy = (path, prev)
            elif child is not None:
                self._count_read(path, prev)
            # Filed under the inode actually read, not the one listed: replaced in between
            # (a rename over it), the listed inode's other names must not get this content.
            hl_key = None if child is None or child.node.links < 2 else (child.node.dev, child.node.inode)
        if child is not None and hl_key is not None:
            self._hardlinks[hl_key] = child
        return child

    def _tell(self, path: bytes, status: str) -> None:
        if self.opts.on_file is not None:
            self.opts.on_file(path, status)

    def _count_read(self, path: bytes, prev: Node | None) -> None:
        if prev is None or prev.type != NodeType.FILE:
            self.log.stats.files_new += 1
            self._tell(path, "A")
        else:
            self.log.stats.files_changed += 1
            self._tell(path, "M")

    def settle_racy(self, path: bytes, same: bool) -> None:
        """A file read again only for the racy window, once its content is known: unmodified
        when it is what the previous run stored, else changed."""
        stats = self.log.stats
        stats.files_reread += 1
        if same:
            stats.files_unmodified += 1
            self._tell(path, "U")
        else:
            stats.files_changed += 1
            self._tell(path, "M")

    def _same_stat(self, prev: Node | None, st: os.stat_result) -> bool:
        return prev is not None and prev.type == NodeType.FILE and (
            prev.size, prev.mtime, prev.ctime, prev.inode) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def _racy(self, prev: Node | None, st: os.stat_result) -> bool:
        return not self.opts.read_all and self._same_stat(prev, st) and prev is not None \
            and prev.ctime >= self._racy_before

    def _reusable(self, prev: Node | None, st: os.stat_result) -> bool:
        # _same_stat inlined: this runs once per file
        if self.opts.read_all or prev is None or prev.type != NodeType.FILE or (
                prev.size, prev.mtime, prev.ctime, prev.inode) != (
                st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino):
            return False
        if prev.ctime >= self._racy_before:
            return False
        if self.previous.blobs_trusted:
            return True
        has = self.store.has_blob
        if prev.pages and not all(has(p) for p in prev.pages):
            return False
        return all(has(b) for r in prev.content for b in ref_blob_ids(r))

    # ------------------------------------------------------------------ page digests
    def _save_page_segment(self, data: bytes | None) -> bytes:
        """Store one segment of page digests (None: the all-holes one) and cache it in the
        catalog; called as each segment completes, also from the digest helper's reader."""
        if data is None and self._zero_segment_id is not None:
            return self._zero_segment_id
        raw = self.content.zero_segment if data is None else data
        bid, _ = self.store.save_blob(BlobType.META, raw, compress=False)
        if self.catalog is not None:
            self.catalog.put_blob(bid, raw)
        if data is None:
            self._zero_segment_id = bid
        return bid

    def _remember_pages(self, ids: list[bytes]) -> None:
        if self.catalog is None or self.previous.kind == "catalog":
            return
        for pid in dict.fromkeys(ids):  # one load each, however often a hole segment repeats
            data = self.previous.meta_blob(pid)
            if data is not None:
                self.catalog.put_blob(pid, data)

    def _prev_content(self, prev: Node | None) -> PrevContent | None:
        """What the delta path compares with, if the previous version can serve: its page
        digests (loaded one segment at a time, when needed) and chunks still stored."""
        if self.opts.read_all or prev is None or not prev.pages or prev.type != NodeType.FILE:
            return None
        if len(prev.pages) != segment_count(prev.size):
            return None
        if not all(self.store.has_blob(b) for r in prev.content for b in ref_blob_ids(r)):
            return None
        return PrevContent(prev.content, prev.pages, prev.size, self.previous.meta_blob, self.store.blob_id)

    # ------------------------------------------------------------------ reading
    def _open(self, dir_fd: int, fsname: bytes, path: bytes) -> int | None:
        """The regular file ``fsname`` of ``dir_fd``, opened for reading (fs.dirfd.open_regular:
        a FIFO or device swapped in is never opened), or None (reported)."""
        try:
            return open_regular(dir_fd, fsname)
        except NotRegular:
            self.log.problem(path, "changed", "no longer a regular file when opened; not read")
        except OSError as exc:
            self.log.os_problem(path, exc)
        return None

    def _read(self, dir_fd: int, fsname: bytes, name: bytes, path: bytes, st: os.stat_result,
              prev: Node | None) -> Child | None:
        prev_content = self._prev_content(prev)
        last_exc: Exception | None = None
        for attempt in range(READ_ATTEMPTS):
            fd = self._open(dir_fd, fsname, path)
            if fd is None:
                return None
            try:
                fst = os.fstat(fd)  # the inode the checked handle named
                try:
                    pending = self.content.read(fd, fst, prev_content)
                except FileChanged as exc:
                    last_exc = exc
                    continue
                after = os.fstat(fd)
                changed = (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
                    fst.st_size, fst.st_mtime_ns, fst.st_ctime_ns)
                if changed and attempt < READ_ATTEMPTS - 1:
                    last_exc = FileChanged("modified while being read")
                    continue
                if changed:
                    self.log.problem(path, "changed",
                                     f"modified while being read {READ_ATTEMPTS} times; stored the last read, "
                                     "which may mix old and new data; the next run reads it again")
                return self._finish_read(fd, dir_fd, fsname, name, path, fst, pending)
            except OSError as exc:
                self.log.problem(path, "unreadable", f"read error: {exc.strerror or exc}")
                return None
            finally:
                os.close(fd)
        self.log.problem(path, "changed", f"kept changing while being read: {last_exc}")
        return None

    def _finish_read(self, fd: int, dir_fd: int, fsname: bytes, name: bytes, path: bytes,
                     fst: os.stat_result, pending: PendingContent) -> Child:
        stats = self.log.stats
        stats.bytes_read += pending.bytes_read
        self.log.reporter.advance(nbytes=fst.st_size, items=1)
        if self.ntfs is None or fst.st_dev != self.ntfs.dev:
            return Child(make_node(name, NodeType.FILE, fst, bounded_xattrs(self.log, fd, path)), False, content=pending)
        node = make_node(name, NodeType.FILE, fst, self.ntfs.xattrs(fd, path))
        node, streams = self.ntfs.node(node, fd, path, dir_fd=dir_fd, fsname=fsname, ino=fst.st_ino)
        return Child(node, False, content=pending, streams=streams)
