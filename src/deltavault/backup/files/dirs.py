"""Finishing directories into tree blobs, in post-order, once their files' chunks are stored.

A directory whose entries are all unchanged keeps its previous tree id without being
re-encoded. Directories wait in a queue, in the order the walk finished them, so a parent
is always finished after its children; the queue drains as their content resolves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from deltavault.backup.files.catalog_writer import CatalogWriter
from deltavault.backup.files.ntfsmeta import PendingStreams, resolve_streams, streams_done
from deltavault.backup.files.options import Store
from deltavault.backup.files.pending import PendingContent
from deltavault.backup.files.previous import PrevDir, PreviousState
from deltavault.model.nodes import Node
from deltavault.model.types import BlobType
from deltavault.objects.trees import encode_tree


@dataclass(slots=True)  # one per entry: slots make it smaller and quicker to make
class Child:
    """An entry of a directory being backed up."""

    node: Node
    clean: bool  # unchanged since the previous run, content and metadata
    content: PendingContent | None = None
    dirjob: DirJob | None = None
    # (original path, previous node) of a file read again only for the racy window
    racy: tuple[bytes, Node] | None = None
    streams: PendingStreams | None = None  # named streams being stored (NTFS)

    def done(self) -> bool:
        return (self.content is None or self.content.done()) and streams_done(self.streams)


@dataclass(slots=True)
class DirJob:
    relpath: bytes
    prev: PrevDir | None
    children: list[Child]
    tree_id: bytes | None = None
    clean: bool = False


class TreeWriter:
    """``page_blob_ids`` collects the page-digest blobs of every file stored (the catalog
    keeps those); ``flush_batch`` sends the content reader's pending small chunks."""

    def __init__(self, store: Store, previous: PreviousState, catalog: CatalogWriter | None,
                 page_blob_ids: set[bytes], flush_batch: Callable[[], None],
                 settle_racy: Callable[[bytes, bool], None] | None = None) -> None:
        self.settle_racy = settle_racy
        self.store = store
        self.previous = previous
        self.catalog = catalog
        self.page_blob_ids = page_blob_ids
        self.flush_batch = flush_batch
        self.queue: deque[DirJob] = deque()

    def add(self, job: DirJob) -> None:
        self.queue.append(job)

    def drain(self, *, block: bool) -> None:
        """Finish the directories whose content is stored; with ``block``, all of them."""
        if block:
            self.flush_batch()
        while self.queue:
            job = self.queue[0]
            if not block and not all(c.done() for c in job.children):
                return
            self._finish_dir(job)
            self.queue.popleft()

    def _resolve(self, child: Child) -> Node:
        node = child.node
        if child.content is not None:
            refs = child.content.refs()
            pages = child.content.page_ids()
            if pages:
                self.page_blob_ids.update(pages)
            node = msgspec.structs.replace(node, content=refs, pages=pages)
            if child.streams:
                node = resolve_streams(node, child.streams)
                child.streams = None
            if child.racy is not None:
                path, prev = child.racy
                same = refs == prev.content and node.win == prev.win
                if same:  # as if reused: the previous node, so the tree stays the same
                    node = msgspec.structs.replace(prev, name=node.name)
                    child.clean = True
                    self.page_blob_ids.update(prev.pages or ())
                if self.settle_racy is not None:
                    self.settle_racy(path, same)
                child.racy = None
            child.node = node
            child.content = None  # hard-linked siblings share the resolved node's content
        elif child.streams:  # a directory's named streams (NTFS)
            node = child.node = resolve_streams(node, child.streams)
            child.streams = None
        if child.dirjob is not None:
            assert child.dirjob.tree_id is not None
            if child.clean and child.node.subtree != child.dirjob.tree_id:
                child.clean = False
            node = msgspec.structs.replace(node, subtree=child.dirjob.tree_id)
            if not child.dirjob.clean:
                child.clean = False
        return node

    def _finish_dir(self, job: DirJob) -> None:
        try:
            self._encode_dir(job)
        finally:
            # The parent reads only tree_id and clean: the entries and the previous listing
            # would otherwise stay alive through it until the root is done (1.2 GB at 1M files).
            job.children = []
            job.prev = None

    def _encode_dir(self, job: DirJob) -> None:
        if self.catalog is not None:
            self.catalog.visit(job.relpath)
        nodes = []
        for c in job.children:
            # Hard-linked siblings: the first one resolved holds the content.
            nodes.append(self._resolve(c))
        prev = job.prev
        if (prev is not None and all(c.clean for c in job.children)
                and len(job.children) == len(prev.nodes) and self.store.has_blob(prev.tree_id)):
            job.tree_id, job.clean = prev.tree_id, True
            if self.catalog is not None and self.previous.kind != "catalog":
                self.catalog.put_dir(job.relpath, prev.tree_id, encode_tree(nodes))
            return
        raw = encode_tree(nodes)
        tid, _ = self.store.save_blob(BlobType.TREE, raw)
        job.tree_id = tid
        job.clean = prev is not None and tid == prev.tree_id
        if self.catalog is not None:
            self.catalog.put_dir(job.relpath, tid, raw)
