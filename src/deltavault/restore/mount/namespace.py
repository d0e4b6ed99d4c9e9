"""Paths of the mount to what they show: the synthetic top (layout.py), snapshot trees,
and volume images.

Thread-safe: the kernel asks from many threads. The snapshot list is read again when it
is older than ``refresh`` seconds and someone looks at the mount, so new snapshots appear
without remounting and forgotten ones disappear; the index is reloaded first whenever the
list changed, so a new snapshot's blobs are known before its tree is read. A snapshot
file is written last by backup, so nothing half-written is ever listed.

Tree listings are checked exactly as restore checks them (restore/listing.py): a listing
with an unsafe or duplicate name is refused whole (EIO), and reported once.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from deltavault.errors import DeltavaultError
from deltavault.fs.paths import display
from deltavault.model.content import Hole
from deltavault.model.nodes import Node, NodeType
from deltavault.model.snapshot import Snapshot
from deltavault.objects.trees import decode_tree
from deltavault.objects.volumes import load_manifest
from deltavault.progress import NullReporter, Reporter
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id
from deltavault.restore.listing import checked_nodes
from deltavault.restore.mount.blobs import MountBlobs
from deltavault.restore.mount.layout import (
    ROOT_INO,
    SnapRoot,
    SynthDir,
    SynthLink,
    build_layout,
    ino,
)
from deltavault.restore.mount.partitions import Partition, partitions
from deltavault.restore.mount.views import ContentView, View, VolumeView, WindowView

LISTINGS_KEPT = 4096  # decoded directory listings kept
_FMT = {NodeType.FILE: stat.S_IFREG, NodeType.DIR: stat.S_IFDIR, NodeType.SYMLINK: stat.S_IFLNK,
        NodeType.FIFO: stat.S_IFIFO, NodeType.CHARDEV: stat.S_IFCHR, NodeType.BLOCKDEV: stat.S_IFBLK}


@dataclass
class NodeItem:
    ino: int
    sid: str
    node: Node


@dataclass
class ImageItem:
    """A volume snapshot's disk image, or one partition of it."""

    ino: int
    sid: str
    mtime_ns: int
    size: int
    part: Partition | None


Item = SynthDir | SynthLink | SnapRoot | NodeItem | ImageItem
Listing = dict[bytes, Node]


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Namespace:
    def __init__(self, repo: Repository, blobs: MountBlobs, *, snapshot: str | None = None,
                 refresh: float = 5.0, reporter: Reporter | None = None) -> None:
        self.repo = repo
        self.blobs = blobs
        self.ttl = refresh
        self.reporter = reporter or NullReporter()
        self.uid, self.gid = os.geteuid(), os.getegid()
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._listings: OrderedDict[bytes, Listing] = OrderedDict()
        self._volumes: dict[str, tuple[VolumeView, list[Partition]]] = {}
        self._reported: set[str] = set()
        self._ids: set[str] = set()
        self._fixed: SnapRoot | None = None
        self._root: SynthDir | SnapRoot = SynthDir(ROOT_INO, time.time_ns())
        self._stamp = 0.0
        if snapshot is not None:
            sid, snap = repo.resolve_snapshot(snapshot)
            self._fixed = self._root = SnapRoot(ROOT_INO, sid, snap)
            self._ids = {sid}
        self.refresh()

    # ------------------------------------------------------------------ the snapshot list
    def problem(self, path: str, message: str, kind: str = "corrupt") -> None:
        if path + message not in self._reported:
            self._reported.add(path + message)
            self.reporter.problem(path, kind, message)

    def refresh(self) -> None:
        """Read the snapshot list again (one thread at a time; the others go on with the
        list they have)."""
        if not self._refreshing.acquire(blocking=False):
            return
        try:
            snaps = self.repo.list_snapshots()
            ids = {sid for sid, _ in snaps}
            if ids != self._ids:
                self.blobs.refresh(self.blobs.generation)  # before any new tree is read
            if self._fixed is None:
                self._root = build_layout(snaps, self.problem)
            elif self._fixed.sid not in ids:
                self.problem(f"snapshot {short_id(self._fixed.sid)}", "was forgotten and pruned", "gone")
            self._ids = ids
            self._stamp = time.monotonic()
        except DeltavaultError as exc:
            self.problem("snapshot list", f"cannot be read now: {exc.message}", "read")
            self._stamp = time.monotonic()
        finally:
            self._refreshing.release()

    def stale(self) -> None:
        """A read failed: the snapshot may be gone; look again at the next lookup."""
        self._stamp = 0.0

    def root(self) -> SynthDir | SnapRoot:
        if time.monotonic() - self._stamp > self.ttl:
            self.refresh()
        return self._root

    # ------------------------------------------------------------------ lookups
    def resolve(self, path: str) -> Item:
        item: Item = self.root()
        for comp in os.fsencode(path).split(b"/"):
            if comp:
                found = self.child(item, comp)
                if found is None:
                    raise _err(errno.ENOENT)
                item = found
        return item

    def child(self, item: Item, name: bytes) -> Item | None:
        if isinstance(item, SynthDir):
            return item.children.get(name)
        if isinstance(item, SnapRoot) and item.snap.kind == "volume":
            return dict(self._images(item)).get(name)
        if isinstance(item, SnapRoot | NodeItem):
            node = self._listing(item).get(name)
            return None if node is None else self._node_item(item, node)
        raise _err(errno.ENOTDIR)

    def children(self, item: Item) -> list[tuple[bytes, Item]]:
        if isinstance(item, SynthDir):
            return list(item.children.items())
        if isinstance(item, SnapRoot) and item.snap.kind == "volume":
            return self._images(item)
        if isinstance(item, SnapRoot | NodeItem):
            return [(name, self._node_item(item, n)) for name, n in self._listing(item).items()]
        raise _err(errno.ENOTDIR)

    @staticmethod
    def _node_item(parent: SnapRoot | NodeItem, node: Node) -> NodeItem:
        sid = parent.sid.encode()
        if node.type != NodeType.DIR and node.links > 1 and node.dev:
            # Every name of a hard-linked file shows the same inode number.
            number = ino(sid, b"link", node.dev.to_bytes(8, "little"), node.inode.to_bytes(8, "little"))
        else:
            number = ino(sid, parent.ino.to_bytes(8, "little"), node.name)
        return NodeItem(number, parent.sid, node)

    def _tree_of(self, item: SnapRoot | NodeItem) -> tuple[bytes | None, str]:
        if isinstance(item, SnapRoot):
            return item.snap.tree, f"snapshot {short_id(item.sid)}"
        if item.node.type != NodeType.DIR:
            raise _err(errno.ENOTDIR)
        return item.node.subtree, display(item.node.name)

    def _listing(self, item: SnapRoot | NodeItem) -> Listing:
        tree_id, where = self._tree_of(item)
        if tree_id is None:
            return {}
        with self._lock:
            found = self._listings.get(tree_id)
            if found is not None:
                self._listings.move_to_end(tree_id)
                return found
        try:
            nodes = checked_nodes(decode_tree(self.blobs.load_blob(tree_id)).nodes, where)
        except DeltavaultError as exc:
            self.problem(where, f"directory listing unreadable: {exc.message}")
            self.stale()
            raise _err(errno.EIO) from exc
        listing = {n.name: n for n in nodes}
        with self._lock:
            self._listings[tree_id] = listing
            while len(self._listings) > LISTINGS_KEPT:
                self._listings.popitem(last=False)
        return listing

    # ------------------------------------------------------------------ volumes
    def volume(self, sid: str, snap: Snapshot) -> tuple[VolumeView, list[Partition]]:
        with self._lock:
            found = self._volumes.get(sid)
        if found is not None:
            return found
        if snap.volume is None:
            raise _err(errno.EIO)
        try:
            view = VolumeView(self.blobs, load_manifest(self.blobs, snap.volume))
            found = (view, partitions(view))
        except DeltavaultError as exc:
            self.problem(f"volume snapshot {short_id(sid)}", f"unreadable: {exc.message}")
            self.stale()
            raise _err(errno.EIO) from exc
        with self._lock:
            self._volumes[sid] = found
        return found

    def _images(self, item: SnapRoot) -> list[tuple[bytes, Item]]:
        view, parts = self.volume(item.sid, item.snap)
        sid = item.sid.encode()
        out: list[tuple[bytes, Item]] = [
            (b"disk.img", ImageItem(ino(b"image", sid), item.sid, item.snap.time_ns, view.size, None))]
        for p in parts:
            out.append((b"part%d.img" % p.number,
                        ImageItem(ino(b"image", sid, b"%d" % p.number), item.sid, item.snap.time_ns, p.size, p)))
        return out

    # ------------------------------------------------------------------ what the kernel asks
    def open(self, item: Item) -> View:
        if isinstance(item, ImageItem):
            snap = self._snapshot(item.sid)
            view, _ = self.volume(item.sid, snap)
            return view if item.part is None else WindowView(view, item.part.offset, item.part.size)
        if isinstance(item, NodeItem) and item.node.type == NodeType.FILE:
            try:
                return ContentView(self.blobs, item.node.content, item.node.size)
            except DeltavaultError as exc:
                self.problem(display(item.node.name), f"{exc.message}; the file is not shown")
                raise _err(errno.EIO) from exc
        raise _err(errno.EISDIR if self.is_dir(item) else errno.EINVAL)

    def _snapshot(self, sid: str) -> Snapshot:
        if self._fixed is not None and self._fixed.sid == sid:
            return self._fixed.snap
        return self.repo.load_snapshot(sid)

    @staticmethod
    def is_dir(item: Item) -> bool:
        return isinstance(item, SynthDir | SnapRoot) or (
            isinstance(item, NodeItem) and item.node.type == NodeType.DIR)

    @staticmethod
    def readlink(item: Item) -> bytes:
        if isinstance(item, SynthLink):
            return item.target
        if isinstance(item, NodeItem) and item.node.type == NodeType.SYMLINK:
            return item.node.target
        raise _err(errno.EINVAL)

    @staticmethod
    def xattrs(item: Item) -> list[tuple[bytes, bytes]]:
        return item.node.xattrs if isinstance(item, NodeItem) else []

    def attrs(self, item: Item) -> dict[str, Any]:
        own = {"st_uid": self.uid, "st_gid": self.gid, "st_nlink": 1, "st_blksize": 4096}
        if isinstance(item, SynthDir | SnapRoot):
            when = item.mtime_ns if isinstance(item, SynthDir) else item.snap.time_ns
            return {**own, "st_mode": stat.S_IFDIR | 0o555, "st_ino": item.ino,
                    "st_mtime": when, "st_atime": when, "st_ctime": when}
        if isinstance(item, SynthLink):
            return {**own, "st_mode": stat.S_IFLNK | 0o777, "st_ino": item.ino, "st_size": len(item.target),
                    "st_mtime": item.mtime_ns, "st_atime": item.mtime_ns, "st_ctime": item.mtime_ns}
        if isinstance(item, ImageItem):
            # Only the mounting user: an image holds every file of the volume, whoever owns it.
            return {**own, "st_mode": stat.S_IFREG | 0o400, "st_ino": item.ino, "st_size": item.size,
                    "st_blocks": -(-item.size // 512), "st_mtime": item.mtime_ns,
                    "st_atime": item.mtime_ns, "st_ctime": item.mtime_ns}
        n = item.node
        size = n.size if n.type == NodeType.FILE else len(n.target) if n.type == NodeType.SYMLINK else 0
        data = sum(r.size for r in n.content if not isinstance(r, Hole))
        return {"st_mode": _FMT[n.type] | (n.mode & 0o7777), "st_ino": item.ino, "st_uid": n.uid,
                "st_gid": n.gid, "st_nlink": max(n.links, 1) if n.type != NodeType.DIR else 1,
                "st_size": size, "st_blocks": -(-data // 512), "st_blksize": 4096, "st_rdev": n.rdev,
                "st_mtime": n.mtime, "st_atime": n.atime, "st_ctime": n.ctime or n.mtime}
