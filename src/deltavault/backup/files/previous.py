"""What the previous run saw, for change detection.

Two providers behind one protocol: the local catalog (no downloads at all) and, when the
catalog is missing or belongs to a snapshot that is gone, the parent snapshot's trees
read from the repository.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from deltavault.backup.files.catalog import Catalog
from deltavault.errors import CorruptionError, DeltavaultError
from deltavault.model.nodes import Node, NodeType
from deltavault.objects.store import BlobLoader
from deltavault.objects.trees import decode_tree


@dataclass
class PrevDir:
    tree_id: bytes
    nodes: dict[bytes, Node]


class PreviousState(Protocol):
    kind: str  # "catalog" | "parent-trees" | "none"
    snapshot_id: str | None
    run_start_ns: int
    # True when no blob can have been removed since these trees were current, so reused
    # references need no per-blob index lookups.
    blobs_trusted: bool

    def dir(self, relpath: bytes) -> PrevDir | None: ...

    def meta_blob(self, blob_id: bytes) -> bytes | None: ...


def _as_prev(tree_id: bytes, raw: bytes) -> PrevDir:
    return PrevDir(tree_id, {n.name: n for n in decode_tree(raw).nodes})


class NoPrevious:
    kind = "none"
    snapshot_id: str | None = None
    run_start_ns = 0
    blobs_trusted = False

    def dir(self, relpath: bytes) -> PrevDir | None:
        return None

    def meta_blob(self, blob_id: bytes) -> bytes | None:
        return None


class CatalogPrevious:
    kind = "catalog"

    def __init__(self, catalog: Catalog, source_id: str, snapshot_id: str, run_start_ns: int,
                 *, blobs_trusted: bool = False) -> None:
        self.catalog = catalog
        self.source_id = source_id
        self.snapshot_id: str | None = snapshot_id
        self.run_start_ns = run_start_ns
        self.blobs_trusted = blobs_trusted

    def dir(self, relpath: bytes) -> PrevDir | None:
        row = self.catalog.get_dir(self.source_id, relpath)
        if row is None:
            return None
        try:
            return _as_prev(*row)
        except CorruptionError:
            return None  # a damaged cache row only costs a re-read

    def meta_blob(self, blob_id: bytes) -> bytes | None:
        return self.catalog.get_blob(self.source_id, blob_id)


class TreePrevious:
    """Reads the parent snapshot's trees from the repository, on demand.

    ``dir`` walks down from the nearest directory it still holds, one level per loop
    turn (no recursion, so any depth works). It holds the most recently used directories
    up to ``CACHE_NODES`` entries in all, and always the ancestors of the last one asked
    for: the walker asks for a directory after its parent, so those are what is reused,
    and a huge previous tree is not kept in memory whole."""

    kind = "parent-trees"
    blobs_trusted = False
    CACHE_NODES = 200_000

    def __init__(self, repo: BlobLoader, root_tree: bytes, snapshot_id: str, run_start_ns: int) -> None:
        self.repo = repo
        self.snapshot_id: str | None = snapshot_id
        self.run_start_ns = run_start_ns
        self._root = root_tree
        self._cache: OrderedDict[bytes, PrevDir | None] = OrderedDict()
        self._cached_nodes = 0

    def _load(self, tree_id: bytes) -> PrevDir | None:
        try:
            return _as_prev(tree_id, self.repo.load_blob(tree_id))
        except DeltavaultError:
            return None

    def _remember(self, relpath: bytes, pdir: PrevDir | None) -> None:
        self._cache[relpath] = pdir
        self._cached_nodes += len(pdir.nodes) if pdir else 0
        if self._cached_nodes <= self.CACHE_NODES:
            return
        # Drop the least recently used, never an ancestor of ``relpath``: its siblings come next.
        for path in list(self._cache):
            if self._cached_nodes <= self.CACHE_NODES:
                break
            if path == b"" or path == relpath or relpath.startswith(path + b"/"):
                continue
            old = self._cache.pop(path)
            self._cached_nodes -= len(old.nodes) if old else 0

    def dir(self, relpath: bytes) -> PrevDir | None:
        # Up to the nearest directory held (or the root), then down one name at a time.
        below: list[bytes] = []
        at = relpath
        while at not in self._cache and at != b"":
            below.append(at)
            at = at.rpartition(b"/")[0]
        if at not in self._cache:
            self._remember(b"", self._load(self._root))
        self._cache.move_to_end(at)
        pdir = self._cache[at]
        for path in reversed(below):
            node = pdir.nodes.get(path.rpartition(b"/")[2]) if pdir is not None else None
            pdir = (self._load(node.subtree) if node is not None and node.type == NodeType.DIR
                    and node.subtree else None)
            self._remember(path, pdir)
        return pdir

    def meta_blob(self, blob_id: bytes) -> bytes | None:
        try:
            return self.repo.load_blob(blob_id)
        except DeltavaultError:
            return None
