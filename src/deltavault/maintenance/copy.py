"""``copy``: snapshots from one repository into another (the 3-2-1 off-site copy), on any
Backend at either end, deduplicated against what the target holds.

Blob ids are keyed per repository, so the same bytes have another id in the target: each
blob is read from the source (checked against its id there), stored in the target under
the target's id (not stored again if the target has it) and every tree is rewritten with
the new ids, bottom up. A map of source ids to target ids, kept in the target's local
cache, lets the next copy skip what it copied before without reading it again: a blob
whose mapped id the target's index still has is not read, and a whole subtree is skipped
while no prune has removed anything from the target since (its live index files are still
all there). Without the map (another machine, a wiped cache), everything is read once.

A copy records its source as ``original`` (the first snapshot of its chain), so running
copy again skips snapshots already copied, and the copy of a snapshot's parent becomes
the copy's parent. Page digests are keyed by the repository's key: a file's (which only
serve the source's next backup) are not copied, a volume's are computed again under the
target's key (restore --volume --verify checks against them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import blake3
import msgspec

from deltavault.chunking.pages import PageHasher
from deltavault.errors import Undecodable, UsageError
from deltavault.framing import decode_msgpack
from deltavault.fs.files import read_cache_file, write_cache_file
from deltavault.model.content import PAGE_SIZE, ContentRef, Full, Hole, Patch, ref_blob_ids
from deltavault.model.nodes import Node, NodeType
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.model.volume import BlockMap, Segment
from deltavault.model.volume import encode as vol_encode
from deltavault.objects.patch import apply_patches
from deltavault.objects.trees import encode_tree, load_nodes
from deltavault.objects.volumes import load_manifest, load_segment_map
from deltavault.progress import NullReporter, Reporter
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id


class _MapFile(msgspec.Struct):
    ids: dict[bytes, bytes]  # source blob id -> target blob id
    index_files: list[str]  # the target's live index files when it was written
    v: int = 1


@dataclass
class CopyStats:
    copied: list[tuple[str, str]] = field(default_factory=list)  # (source id, new target id)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source id, existing copy)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (source id, why)
    blobs_read: int = 0
    bytes_read: int = 0
    blobs_new: int = 0


class Copier:
    def __init__(self, src: Repository, dst: Repository, reporter: Reporter | None = None) -> None:
        if src.config.id == dst.config.id:
            raise UsageError("the source and the target are the same repository")
        self.src, self.dst = src, dst
        self.reporter = reporter or NullReporter()
        self.stats = CopyStats()
        self._key = dst.cache_key("copy map") or b"\0" * 32
        # The map speaks for one source, so its MAC binds the source too, by a secret of it:
        # the map file is named by the source's config id, which an unencrypted source can
        # set to anything (its config is plain JSON), and a source claiming the id of another
        # one copied before must not get that map's mappings: its trees could then name blobs
        # of the other source that it never held, and the target would take them unread. An
        # unencrypted source has no secret; its ids are plain BLAKE3 and name the same bytes
        # in any repository.
        src_key = src.cache_key("copy map source")
        self._bind = blake3.blake3(src_key if src_key is not None
                                   else b"unencrypted " + src.config.id.encode()).digest()
        self._path = dst.cache_dir / "copy" / src.config.id if dst.cache_dir is not None else None
        self.ids, trusted_files = self._load_map()
        # The target's blobs in packs gone from it count as absent: copied again, not
        # deduplicated against (repository/packcheck.py).
        self.packs = dst.check_packs()
        # No index file gone since the map was written, and no blob dropped for a missing
        # pack: nothing was removed, so a mapped tree still has everything below it.
        self._trees_trusted = (not self.packs.dropped and bool(trusted_files)
                               and trusted_files <= dst.live_index_files())
        existing = dst.list_snapshots()
        self._copies = {s.original: sid for sid, s in existing if s.original}
        self._now: set[bytes] = set()  # trees this run stored

    # ------------------------------------------------------------------ the map
    def _load_map(self) -> tuple[dict[bytes, bytes], set[str]]:
        raw = read_cache_file(self._path) if self._path is not None else None
        if raw is None or len(raw) < 32:
            return {}, set()
        body, mac = raw[:-32], raw[-32:]
        if blake3.blake3(self._bind + body, key=self._key).digest() != mac:
            return {}, set()  # not written by us for this target and this source: not trusted
        try:
            m = decode_msgpack(body, _MapFile)
        except Undecodable:
            return {}, set()
        return m.ids, set(m.index_files)

    def save_map(self) -> None:
        if self._path is None:
            return
        body = msgspec.msgpack.encode(_MapFile(self.ids, sorted(self.dst.live_index_files())))
        write_cache_file(self._path, body + blake3.blake3(self._bind + body, key=self._key).digest())

    # ------------------------------------------------------------------ snapshots
    def copy(self, sid: str, snap: Snapshot) -> str | None:
        """Copy one snapshot; returns the new id, or None when the target already has it."""
        origin = snap.original or sid
        if origin in self._copies:
            self.stats.skipped.append((sid, self._copies[origin]))
            return None
        if snap.tree is not None:
            new_root = {"tree": self._tree(snap.tree)}
        elif snap.volume is not None:
            new_root = {"volume": self._volume(snap.volume)}
        else:
            self.stats.refused.append((sid, "the snapshot names neither a tree nor a volume"))
            return None
        self.dst.flush()  # everything the snapshot names is stored and indexed before it
        parent = None
        if snap.parent is not None:
            parent = self._copies.get(snap.parent) or self._copies.get(self._origin_of(snap.parent))
        # The tag's key is derived from the source repository's id: it could not verify here.
        new = msgspec.structs.replace(snap, parent=parent, original=origin, host_tag=None, **new_root)
        new_id = self.dst.save_snapshot(new)
        self._copies[origin] = new_id
        self.stats.copied.append((sid, new_id))
        return new_id

    def _origin_of(self, sid: str) -> str:
        try:
            return self.src.load_snapshot(sid).original or sid
        except Exception:  # a parent forgotten since: no copy of it to point at
            return sid

    # ------------------------------------------------------------------ blobs and trees
    def _mapped(self, bid: bytes) -> bytes | None:
        got = self.ids.get(bid)
        return got if got is not None and self.dst.has_blob(got) else None

    def _blobs(self, ids: list[bytes], btype: BlobType) -> None:
        """Store in the target the blobs of ``ids`` it lacks, read from the source together."""
        todo = [b for b in dict.fromkeys(ids) if self._mapped(b) is None]
        for bid, data in self.src.load_blobs(todo):
            self._store(bid, data, btype)

    def _store(self, bid: bytes, data: bytes, btype: BlobType) -> None:
        """The source's blob ``bid`` (its bytes ``data``) into the target, and into the map."""
        new, added = self.dst.save_blob(btype, data)
        self.ids[bid] = new
        self.stats.blobs_read += 1
        self.stats.bytes_read += len(data)
        self.stats.blobs_new += added > 0
        self.reporter.advance(nbytes=len(data))

    def _ref(self, r: ContentRef) -> ContentRef:
        m: Callable[[bytes], bytes] = self.ids.__getitem__
        if isinstance(r, Full):
            return Full(m(r.id), r.size)
        if isinstance(r, Patch):
            return Patch(m(r.base), [m(p) for p in r.patches], r.size, r.pages)
        assert isinstance(r, Hole)
        return r

    def _tree(self, root: bytes) -> bytes:
        """Copy the tree ``root`` and all below it; returns its id in the target. Post-order
        with an explicit stack, so any depth is fine."""
        if self._tree_done(root):
            return self.ids[root]
        stack = [_Dir(root, load_nodes(self.src, root))]
        while True:
            d = stack[-1]
            if d.i < len(d.nodes):
                n = d.nodes[d.i]
                d.i += 1
                if n.type == NodeType.DIR and n.subtree is not None and not self._tree_done(n.subtree):
                    stack.append(_Dir(n.subtree, load_nodes(self.src, n.subtree)))
                continue
            nodes = d.nodes
            self._blobs([b for n in nodes for r in n.content for b in ref_blob_ids(r)], BlobType.DATA)
            out = [msgspec.structs.replace(n, content=[self._ref(r) for r in n.content], pages=None,
                                           subtree=self.ids[n.subtree] if n.subtree is not None else None)
                   for n in nodes]
            new, added = self.dst.save_blob(BlobType.TREE, encode_tree(out))
            self.ids[d.tree] = new
            self._now.add(d.tree)
            self.stats.blobs_new += added > 0
            self.reporter.advance(items=1)
            stack.pop()
            if not stack:
                return new

    def _volume(self, manifest_id: bytes) -> bytes:
        """A volume manifest and its segments. Block maps are rewritten with the target's
        blob ids; page digests are keyed by the repository's key, so they are computed
        again, under the target's, from the blocks' content (what a restore writes: the
        segment's pages, zeros past the end). The change sources' state only speeds up the
        source's next backup and is not copied; the target's first volume backup of that
        disk reads it whole."""
        done = self._mapped(manifest_id)
        if done is not None:
            return done
        m = load_manifest(self.src, manifest_id)
        hasher = PageHasher(self.dst.master.mac if self.dst.master else None)
        segments = []
        for i, seg in enumerate(m.segments):
            new_map, new_dig = self._mapped(seg.map), self._mapped(seg.digests)
            if new_map is None or new_dig is None:
                bm = load_segment_map(self.src, m, i)
                digests = bytearray()
                for r in bm.refs:
                    data = self._block(r)
                    pad = -len(data) % PAGE_SIZE  # the volume's last page is digested padded with zeros
                    digests += hasher.digests(data + bytes(pad) if pad else data)
                new_map = self.dst.save_blob(BlobType.META, vol_encode(
                    BlockMap(first=bm.first, refs=[self._ref(r) for r in bm.refs])))[0]
                new_dig = self.dst.save_blob(BlobType.META, bytes(digests), compress=False)[0]
                self.ids[seg.map], self.ids[seg.digests] = new_map, new_dig
            segments.append(Segment(new_map, new_dig))
        new = msgspec.structs.replace(m, segments=segments, checkpoints=[])
        nid = self.dst.save_blob(BlobType.META, vol_encode(new))[0]
        self.ids[manifest_id] = nid
        return nid

    def _block(self, r: ContentRef) -> bytes:
        """A volume block's bytes, read from the source once; its blobs stored in the target."""
        if isinstance(r, Hole):
            return bytes(r.size)
        blobs = {b: self.src.load_blob(b) for b in ref_blob_ids(r)}
        for b, data in blobs.items():
            if self._mapped(b) is None:
                self._store(b, data, BlobType.DATA)
        if isinstance(r, Full):
            return blobs[r.id]
        assert isinstance(r, Patch)
        return apply_patches(blobs[r.base], [blobs[p] for p in r.patches], r.size)

    def _tree_done(self, tid: bytes) -> bool:
        """The subtree is in the target as a whole (this run copied it, or the map says so
        and nothing was removed from the target since)."""
        new = self.ids.get(tid)
        return new is not None and (tid in self._now or self._trees_trusted) and self.dst.has_blob(new)


@dataclass
class _Dir:
    tree: bytes
    nodes: list[Node]
    i: int = 0


def describe(stats: CopyStats) -> str:
    return (f"copied {len(stats.copied)} snapshot(s), {len(stats.skipped)} already in the target; "
            f"{stats.blobs_read} blob(s) read, {stats.blobs_new} new in the target"
            + "".join(f"\n  {short_id(s)}: {why}" for s, why in stats.refused))
