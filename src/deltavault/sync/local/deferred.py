"""Directory metadata that waits for the end of a local run: directories that receive hard
links (linking changes a directory's mtime, and links are made once every file is in
place), and subtrees synced by worker processes. Set deepest first, each directory found
again from DST's root and checked to be the one this run met."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from deltavault.fs.dirfd import Identity, identity, open_dir_path
from deltavault.fs.ntfs import ReadResult
from deltavault.sync.local.context import LocalRun

Xattrs = list[tuple[bytes, bytes]] | None


@dataclass
class Deferred:
    relpath: bytes
    st: os.stat_result  # the source directory's
    xattrs: Xattrs
    dident: Identity | None
    ntfs: ReadResult | None = None  # its NTFS metadata (local/ntfs.py)


class DeferredMeta:
    def __init__(self, run: LocalRun) -> None:
        self.run = run
        self.items: list[Deferred] = []
        self._lock = threading.Lock()

    def add(self, relpath: bytes, st: os.stat_result, xattrs: Xattrs, dident: Identity | None,
            ntfs: ReadResult | None = None) -> None:
        with self._lock:
            self.items.append(Deferred(relpath, st, xattrs, dident, ntfs))

    def finish(self, relinked: set[bytes], dir_ids: dict[bytes, Identity]) -> None:
        """Set every deferred metadata. ``relinked``: directories that got links after a
        worker set their metadata (read again from SRC); ``dir_ids``: their identities."""
        run = self.run
        have = {d.relpath for d in self.items}
        for rel in relinked - have:
            try:
                sfd = open_dir_path(run.sroot, rel)
            except OSError:
                continue
            try:
                st = os.fstat(sfd)
                got = run.meta.source_xattrs(fd=sfd)  # (what is left out was named at its first read)
                xattrs = got.values if got is not None else None
                ntfs = run.ntfs.read_dir(sfd) if run.ntfs is not None else None
            except OSError:
                continue
            finally:
                os.close(sfd)
            self.items.append(Deferred(rel, st, xattrs, dir_ids.get(rel), ntfs))
        for d in sorted(self.items, key=lambda x: -x.relpath.count(b"/") - bool(x.relpath)):
            try:
                fd = open_dir_path(run.droot, d.relpath)
            except OSError as exc:
                run.out.os_problem(d.relpath, exc, "metadata")
                continue
            try:
                if d.dident is not None and identity(os.fstat(fd)) != d.dident:
                    run.out.problem(d.relpath, "changed", "replaced by another directory during the run; "
                                    "its metadata was not set")
                    continue
                run.rx.dir_meta(fd, d.relpath, d.st, d.xattrs)
                if d.ntfs is not None and run.ntfs is not None:
                    run.ntfs.finish_dir(fd, d.relpath, d.ntfs, run.out)
            finally:
                os.close(fd)
