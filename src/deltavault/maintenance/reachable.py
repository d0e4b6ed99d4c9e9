"""Which indexed blobs snapshots reference, kept as a bitmap over index positions.

One bit per blob instead of a set of 32-byte ids: a million blobs cost 125 KB. A tree
already marked is not walked again, so shared subtrees are read once.
"""

from __future__ import annotations

from collections.abc import Callable

from deltavault.errors import CorruptionError, DeltavaultError
from deltavault.model.content import ref_blob_ids
from deltavault.model.nodes import NodeType
from deltavault.model.snapshot import Snapshot
from deltavault.objects.trees import load_nodes
from deltavault.objects.volumes import volume_blob_ids
from deltavault.repository.index import Index
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id


class Bitmap:
    def __init__(self, n: int) -> None:
        self.n = n
        self.bits = bytearray((n + 7) // 8)

    def set(self, i: int) -> None:
        self.bits[i >> 3] |= 1 << (i & 7)

    def clear(self, i: int) -> None:
        self.bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def __getitem__(self, i: int) -> bool:
        return i < self.n and bool(self.bits[i >> 3] >> (i & 7) & 1)

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.bits)


class Marker:
    """Marks blobs reachable from snapshots in ``used``. Blobs referenced but absent from
    the index are counted in ``missing`` (the caller decides whether that is fatal).

    ``skip_tree(pos)``: a tree at this index position need not be walked (its whole
    subtree is known to be marked already)."""

    def __init__(self, repo: Repository, used: Bitmap,
                 on_blob: Callable[[bytes, int], None] | None = None,
                 skip_tree: Callable[[int], bool] | None = None) -> None:
        self.repo = repo
        self.index: Index = repo.index
        self.used = used
        self.on_blob = on_blob
        # used.__getitem__, not a lambda over self: that cycle would keep the Marker, and with it
        # the Index, alive until a garbage collection (prune rebuilds the index after it).
        self.skip_tree = skip_tree or used.__getitem__
        self.missing: set[bytes] = set()
        self.trees_read = 0

    def _mark(self, blob_id: bytes) -> int | None:
        pos = self.index.position(blob_id)
        if pos is None:
            self.missing.add(blob_id)
            return None
        if pos < self.used.n:
            self.used.set(pos)
        if self.on_blob is not None:
            self.on_blob(blob_id, pos)
        return pos

    def mark_snapshot(self, sid: str, snap: Snapshot) -> None:
        if snap.tree is not None:
            self.mark_tree(snap.tree, sid)
        if snap.volume is not None and self._mark(snap.volume) is not None:
            for b in volume_blob_ids(self.repo, snap.volume):
                self._mark(b)

    def mark_tree(self, root: bytes, sid: str) -> None:
        stack = [root]
        while stack:
            tid = stack.pop()
            pos = self.index.position(tid)
            if pos is None:
                self.missing.add(tid)
                continue
            if self.skip_tree(pos):
                continue
            self._mark(tid)
            try:
                nodes = load_nodes(self.repo, tid)
            except DeltavaultError as exc:
                raise CorruptionError(f"snapshot {short_id(sid)}: tree {tid.hex()[:16]} cannot be read "
                                      f"({exc}); run 'deltavault check' and 'deltavault repair'") from exc
            self.trees_read += 1
            for n in nodes:
                for r in n.content:
                    for b in ref_blob_ids(r):
                        self._mark(b)
                for b in n.pages or ():
                    self._mark(b)
                if n.type == NodeType.DIR and n.subtree is not None:
                    stack.append(n.subtree)
