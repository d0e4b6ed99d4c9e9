"""Hard links met by a local sync. The first name of a file with several links is copied;
the others are linked to it once every file is in place (by the shared receiver, through a
handle to the file installed or kept), and their directories get their metadata after
that. Worker processes report their groups; one that spans subtrees is joined by the main
process (local/shards.py)."""

from __future__ import annotations

import os
import threading

from deltavault.fs.dirfd import Identity
from deltavault.sync.local.context import LocalRun
from deltavault.sync.local.dirs import Dir


class Links:
    def __init__(self, run: LocalRun) -> None:
        self.run = run
        self.dir_ids: dict[bytes, Identity] = {}  # DST directories holding hard-linked names
        self.relinked_dirs: set[bytes] = set()  # directories a worker finished before they got links
        self._lock = threading.Lock()

    def further_name(self, d: Dir, relpath: bytes, st: os.stat_result) -> bool:
        """A file with other links, met at ``relpath`` in ``d``: True when it is a further
        name of a file met before (linked at the end, not copied)."""
        first = self.run.source.first_path((st.st_dev, st.st_ino), relpath)
        with self._lock:
            self.dir_ids[d.relpath] = d.dident
        if first == relpath:
            return False
        self.run.rx.groups.add(relpath, first)
        d.deferred = True
        return True

    def relink(self, paths: list[bytes], first: bytes) -> None:
        """Names a worker linked among themselves that must be links of ``first`` instead."""
        with self._lock:
            for p in paths:
                self.run.rx.groups.add(p, first)
                self.relinked_dirs.add(p.rpartition(b"/")[0])

    def add_dir_ids(self, ids: dict[bytes, Identity]) -> None:
        with self._lock:
            self.dir_ids.update(ids)

    def groups(self) -> dict[tuple[int, int], list[bytes]]:
        """Source inode -> DST paths, the copied one first (for merging across workers)."""
        firsts = self.run.source.firsts
        groups = {k: [v] for k, v in firsts.items()}
        by_path = {v: k for k, v in firsts.items()}
        for rel, first in self.run.rx.groups.pending:
            groups[by_path[first]].append(rel)
        return groups
