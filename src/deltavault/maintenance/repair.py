"""Repair: rebuild the index from the packs themselves and report what is lost.

Under the exclusive lock: every pack is read whole. A sound pack (name matches its bytes,
header parses, every blob opens and matches its id) is indexed from its header. From a
damaged pack the blobs that still verify are copied into new packs (located by its header,
or by the old index when the header is gone) and the pack is removed. Then one new index
supersedes every old index file, readable or not. Unreadable snapshot files are removed.
Snapshots whose trees lose blobs are reported with the paths hit; with ``rewrite`` they are
replaced by a copy whose lost ranges read as zeros (holes), lost directories as empty ones,
and each damaged file is marked with the xattr ``user.deltavault.damaged``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import blake3
import msgspec

from deltavault.errors import CorruptionError, DeltavaultError, ObjectNotFound
from deltavault.maintenance.check import check_repository
from deltavault.maintenance.findings import CheckReport
from deltavault.model.content import ContentRef, Full, Hole, Patch, ref_blob_ids
from deltavault.model.nodes import Node, NodeType
from deltavault.model.types import BlobType
from deltavault.objects.trees import encode_tree, load_nodes
from deltavault.repository.hosttag import carried_tag
from deltavault.repository.pack import PackEntry, pack_name, read_pack_entries
from deltavault.repository.packwriter import PackWriter
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id

INDEX_CHUNK = 100_000
DAMAGED_XATTR = b"user.deltavault.damaged"


@dataclass
class RepairReport:
    packs: int = 0
    packs_sound: int = 0
    packs_salvaged: list[str] = field(default_factory=list)  # damaged packs whose good blobs moved
    packs_unreadable: list[str] = field(default_factory=list)  # indexed packs that are gone
    # packs the store did not answer for (an error, after the retries): left as they were,
    # indexed as before, since nothing shows them damaged
    packs_left: list[str] = field(default_factory=list)
    blobs_indexed: int = 0
    blobs_salvaged: int = 0
    blobs_lost: int = 0
    index_files_removed: int = 0
    damaged_index_files: list[str] = field(default_factory=list)
    snapshots_removed: list[str] = field(default_factory=list)  # unreadable snapshot files
    affected: dict[str, list[str]] = field(default_factory=dict)  # snapshot -> lost paths
    rewritten: dict[str, str] = field(default_factory=dict)  # old snapshot -> new snapshot
    dry_run: bool = False


Progress = Callable[[str], None]


def repair(repo: Repository, *, rewrite: bool = False, dry_run: bool = False, lock_wait: float = 0.0,
           progress: Progress | None = None) -> RepairReport:
    """``repo`` should be opened with ``tolerant=True`` so damaged index files do not stop it."""
    say = progress or (lambda _m: None)
    rep = RepairReport(dry_run=dry_run, damaged_index_files=[n for n, _ in repo.index_errors])
    with repo.lock(exclusive=True, command="repair", wait=lock_wait):
        old_index = repo.index_names()
        entries_by_pack = repo.index.entries_by_pack()  # only consulted for packs with a lost header
        on_disk = repo.list_pack_names()
        rep.packs = len(on_disk)
        writer = PackWriter(repo)
        keep: list[tuple[bytes, list[PackEntry]]] = []
        salvaged: list[bytes] = []
        good_ids: set[bytes] = set()
        say(f"reading {len(on_disk)} packs")
        for pid in sorted(on_disk):
            try:
                good, sound, data = _scan_pack(repo, pid, entries_by_pack.get(pid, []), rep)
            except ObjectNotFound as exc:  # gone since the listing
                rep.packs_unreadable.append(f"{pid.hex()[:16]}: {exc}")
                rep.blobs_lost += len(entries_by_pack.get(pid, []))
                continue
            except DeltavaultError as exc:
                # Not read is not damaged: only a pack whose bytes failed their checks is
                # salvaged and deleted below (a store failing for a moment, or all along,
                # had every pack it did not answer for deleted). This one stays as it was.
                rep.packs_left.append(f"{pid.hex()[:16]}: {exc}")
                good_ids.update(e.id for e in entries_by_pack.get(pid, []))
                keep.append((pid, entries_by_pack.get(pid, [])))
                continue
            good_ids.update(e.id for e in good)
            if sound:
                rep.packs_sound += 1
                keep.append((pid, good))
            else:
                salvaged.append(pid)
                rep.packs_salvaged.append(pid.hex()[:16])
                if not dry_run:
                    # The very bytes each blob was verified in: a second read may answer
                    # others (a store that lies or fails in transit), and the pack they
                    # came from is deleted below.
                    for e in good:
                        writer.add(e.type, e.id, data[e.offset:e.offset + e.length], e.raw_length)
                rep.blobs_salvaged += len(good)
            del data
        for pid, entries in entries_by_pack.items():
            if pid not in on_disk:
                rep.packs_unreadable.append(f"{pid.hex()[:16]}: missing")
                rep.blobs_lost += sum(1 for e in entries if e.id not in good_ids)
        if dry_run:
            rep.blobs_indexed = sum(len(e) for _p, e in keep) + rep.blobs_salvaged
            return rep
        new_packs = writer.finish()
        rep.blobs_indexed = _write_index(repo, keep + new_packs, old_index)
        for pid in salvaged:
            repo.backend.delete(pack_name(pid))
        for name in old_index:
            repo.backend.delete(name)
            rep.index_files_removed += 1
        repo.cache.prune("index", set(repo.index_names()))
        _reload(repo)
        _drop_unreadable_snapshots(repo, rep)
        check = check_repository(repo)
        rep.affected = {sid: sorted(set(paths)) for sid, paths in check.affected.items()}
        if rewrite and rep.affected:
            say(f"rewriting {len(rep.affected)} snapshot(s)")
            _rewrite_snapshots(repo, check, rep)
    return rep


def _scan_pack(repo: Repository, pid: bytes, old_entries: list[PackEntry],
               rep: RepairReport) -> tuple[list[PackEntry], bool, bytes]:
    """(blobs that verify, whether the pack is sound as it is, the bytes they verify in).
    Raises when the store does not answer."""
    name = pack_name(pid)
    data = repo.backend.get(name)
    sound = blake3.blake3(data).digest() == pid
    try:
        entries = read_pack_entries(repo.env, data, name)
    except DeltavaultError:
        entries, sound = old_entries, False  # header lost: the old index still says where blobs are
    good: list[PackEntry] = []
    seen: set[bytes] = set()
    mv = memoryview(data)
    for e in entries:
        if e.id in seen:
            continue
        try:
            if e.offset + e.length > len(data):
                raise CorruptionError("beyond the end of the pack")
            repo.open_blob(e.id, mv[e.offset:e.offset + e.length])
        except DeltavaultError:
            sound = False
            rep.blobs_lost += 1
            continue
        seen.add(e.id)
        good.append(e)
    return good, sound, data


def _write_index(repo: Repository, packs: list[tuple[bytes, list[PackEntry]]], old: list[str]) -> int:
    """Chunked; only the last file supersedes the old ones (a crash leaves duplicates)."""
    total = 0
    chunk: list[tuple[bytes, list[PackEntry]]] = []
    count = 0
    for pid, entries in packs:
        chunk.append((pid, entries))
        count += len(entries)
        total += len(entries)
        if count >= INDEX_CHUNK:
            repo.write_index_file(chunk)
            chunk, count = [], 0
    repo.write_index_file(chunk, supersedes=old)
    return total


def _reload(repo: Repository) -> None:
    repo.index_errors.clear()
    repo.refresh_index(force=True)


def _drop_unreadable_snapshots(repo: Repository, rep: RepairReport) -> None:
    for sid in repo.snapshot_ids():
        try:
            repo.load_snapshot(sid)
        except ObjectNotFound:
            continue
        except CorruptionError:
            repo.delete_snapshot(sid)
            rep.snapshots_removed.append(sid)


def _rewrite_snapshots(repo: Repository, check: CheckReport, rep: RepairReport) -> None:
    memo: dict[bytes, bytes] = {}
    for sid in sorted(rep.affected):
        snap = repo.load_snapshot(sid)
        if snap.tree is None:
            continue  # volume snapshots: their engine owns the manifest format
        new_root = _rewrite_tree(repo, snap.tree, memo)
        if new_root == snap.tree:
            continue
        repo.flush()
        new = carried_tag(snap, msgspec.structs.replace(snap, tree=new_root, parent=sid,  # its tree changed
                                                        tags=sorted({*snap.tags, "repaired"})))
        new_id = repo.save_snapshot(new)
        repo.delete_snapshot(sid)
        rep.rewritten[sid] = new_id
    repo.flush()


def _ok(repo: Repository, bid: bytes) -> bool:
    return bid in repo.index


def _fix_refs(repo: Repository, refs: list[ContentRef]) -> tuple[list[ContentRef], bool]:
    out: list[ContentRef] = []
    lost = False
    for r in refs:
        if isinstance(r, (Full, Patch)) and not all(_ok(repo, b) for b in ref_blob_ids(r)):
            out.append(Hole(r.size))
            lost = True
        else:
            out.append(r)
    return out, lost


def _rewrite_tree(repo: Repository, root: bytes, memo: dict[bytes, bytes]) -> bytes:
    """The id of a copy of tree ``root`` without lost references (``memo``: old id -> new
    id of trees already rewritten). Iterative post-order: a directory is saved once every
    subdirectory below it has its new id, at any depth."""
    stack = [_Rewrite(repo, root)]
    while stack:
        top = stack[-1]
        if top.nodes is not None and top.i < len(top.nodes):
            n = top.nodes[top.i]
            if n.type == NodeType.DIR and n.subtree is not None and n.subtree not in memo:
                stack.append(_Rewrite(repo, n.subtree))
                continue
            top.out.append(_rewrite_node(repo, n, memo))
            top.i += 1
            continue
        stack.pop()
        if top.nodes is not None and top.out == top.nodes:
            memo[top.tid] = top.tid
        else:  # changed, or the listing is lost: an empty directory stands in
            memo[top.tid], _ = repo.save_blob(BlobType.TREE, encode_tree(top.out))
    return memo[root]


class _Rewrite:
    """A directory being rewritten: its entries, the next one, and the entries rewritten so far."""

    __slots__ = ("i", "nodes", "out", "tid")

    def __init__(self, repo: Repository, tid: bytes) -> None:
        self.tid = tid
        try:
            self.nodes: list[Node] | None = load_nodes(repo, tid) if _ok(repo, tid) else None
        except DeltavaultError:
            self.nodes = None
        self.out: list[Node] = []
        self.i = 0


def _rewrite_node(repo: Repository, n: Node, memo: dict[bytes, bytes]) -> Node:
    if n.type == NodeType.DIR and n.subtree is not None:
        return msgspec.structs.replace(n, subtree=memo[n.subtree])
    if not (n.content or n.pages):
        return n
    refs, lost = _fix_refs(repo, n.content)
    pages = n.pages if n.pages is None or all(_ok(repo, b) for b in n.pages) else None
    if lost:
        marks = [x for x in n.xattrs if x[0] != DAMAGED_XATTR]
        marks.append((DAMAGED_XATTR, b"lost ranges were replaced by zeros by deltavault repair"))
        return msgspec.structs.replace(n, content=refs, pages=pages, xattrs=sorted(marks))
    if pages is not n.pages:
        return msgspec.structs.replace(n, pages=pages)
    return n


__all__ = ["RepairReport", "repair", "short_id"]
