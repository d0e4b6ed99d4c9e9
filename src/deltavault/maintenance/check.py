"""Repository checks.

Structure: index files parse, every indexed pack exists, every snapshot parses and every
blob its trees refer to is indexed. With ``read_data``: every pack is read whole, its
name (a BLAKE3 of its bytes) checked, its header compared with the index, and every blob
decrypted and checked against its id and its indexed length, and every patch blob parsed as
restore parses it (patchcheck.py). ``subset`` does the same for the packs it chooses, and
reads no other. With ``headers``, the packs not read are checked by their header alone.
Damage is traced to the snapshots and files it hits.
"""

from __future__ import annotations

import math
import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import blake3

from deltavault.errors import CorruptionError, DeltavaultError
from deltavault.fs.paths import check_name, display
from deltavault.maintenance.findings import CheckIssue, CheckReport
from deltavault.maintenance.patchcheck import PatchCheck, refused
from deltavault.maintenance.volume_check import check_volume_manifest
from deltavault.model.content import content_size, ref_blob_ids
from deltavault.model.nodes import Node, NodeType
from deltavault.model.status import CHECK, StatusRecord
from deltavault.objects.trees import load_nodes
from deltavault.repository.pack import PackEntry, pack_name, read_pack_entries
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id
from deltavault.repository.status import rfc3339

_HEADER_THREADS = 8  # header reads in flight (one small request each)


@dataclass(frozen=True)
class DataSubset:
    """Which packs ``--read-data-subset`` reads: ``slice`` n of m (packs whose id's first byte
    is n-1 modulo m: running 1/m to m/m reads every pack once), ``share`` (a random share
    of the packs) or ``size`` (random packs up to this many bytes)."""

    kind: str  # slice | share | size
    n: int = 0
    m: int = 0
    share: float = 0.0
    size: int = 0
    text: str = ""  # as the user gave it: how output and status records name the subset

    def choose(self, packs: dict[bytes, int], rnd: random.Random | None = None) -> dict[bytes, int]:
        if self.kind == "slice":
            return {p: s for p, s in packs.items() if p[0] % self.m == self.n - 1}
        order = sorted(packs)
        (rnd or random.SystemRandom()).shuffle(order)
        if self.kind == "share":
            return {p: packs[p] for p in order[:math.ceil(len(order) * self.share)]}
        out: dict[bytes, int] = {}
        total = 0
        for p in order:
            if total >= self.size:
                break
            out[p] = packs[p]
            total += packs[p]
        return out


def check_repository(repo: Repository, *, read_data: bool = False, subset: DataSubset | None = None,
                     headers: bool = False, progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """``subset``: read only those packs (implies reading data). ``headers``: read the
    header of every indexed pack the data pass does not read (a ranged read at its end)."""
    rep = CheckReport()
    for name, msg in repo.index_errors:
        rep.add(CheckIssue("index", f"{name}: {msg}"))
    packs_on_disk = repo.list_pack_names()
    indexed = set(repo.index.packs())
    rep.packs = len(packs_on_disk)
    for pid in sorted(indexed - packs_on_disk.keys()):
        rep.add(CheckIssue("pack", f"pack {pid.hex()[:16]} is in the index but missing from the repository"))
    for pid in sorted(packs_on_disk.keys() - indexed):
        rep.add(CheckIssue("orphan", f"pack {pid.hex()[:16]} is not in any index (an interrupted run; "
                                      "the next backup adopts it, prune removes it)", severity="warning"))
    missing_blobs: set[bytes] = set()
    read: dict[bytes, int] = {}  # the packs the data pass reads: every one, or the subset's
    if read_data or subset is not None:
        read = subset.choose(packs_on_disk) if subset else packs_on_disk
        _read_all_packs(repo, read, indexed, rep, progress)
    if headers:
        _check_headers(repo, {p: s for p, s in packs_on_disk.items() if p in indexed and p not in read}, rep)
    for pid in indexed - packs_on_disk.keys():
        missing_blobs.update(e.id for e in repo.index.entries_by_pack().get(pid, []))
    bad = rep.damaged_blobs | missing_blobs
    # The patches in the packs read are parsed as restore parses them (patchcheck.py).
    _check_snapshots(repo, rep, bad, PatchCheck(repo, bad, lambda b: _pack_of(repo, b) in read) if read else None)
    return rep


def _pack_of(repo: Repository, blob_id: bytes) -> bytes | None:
    loc = repo.index.lookup(blob_id)
    return None if loc is None else loc.pack_id


def check_record(rep: CheckReport, *, read_data: bool, start_ns: int,
                 subset: DataSubset | None = None) -> StatusRecord:
    """The status record of a check that started at ``start_ns`` (for reports). ``read_data``
    is recorded only for a full read: a subset (which wins over ``read_data``, as in
    ``check_repository``) is named in ``read_data_subset``."""
    errors = len(rep.errors)
    read = ("" if not read_data and subset is None else f", {rep.blobs_checked} blobs read"
            + (f" in {rep.packs_read} pack(s) of subset {subset.text}" if subset is not None else ""))
    text = (f"{rep.snapshots} snapshots, {rep.packs} packs" + read
            + (": no errors found" if not errors else f": {errors} error(s)"))
    return StatusRecord(kind=CHECK, time=rfc3339(start_ns), time_ns=start_ns, hostname=socket.gethostname(),
                        ok=not errors, message=text, seconds=round((time.time_ns() - start_ns) / 1e9, 3),
                        errors=errors, warnings=len(rep.issues) - errors, read_data=read_data and subset is None,
                        read_data_subset=subset.text if subset is not None else "",
                        snapshots=rep.snapshots, packs=rep.packs, blobs_checked=rep.blobs_checked)


def _read_all_packs(repo: Repository, packs: dict[bytes, int], indexed: set[bytes], rep: CheckReport,
                    progress: Callable[[int, int], None] | None) -> None:
    by_pack = repo.index.entries_by_pack()
    total = sum(packs.values())
    done = 0
    for pid, size in sorted(packs.items()):
        name = pack_name(pid)
        expected = by_pack.get(pid, [])
        try:
            data = repo.backend.get(name)
        except DeltavaultError as exc:
            rep.add(CheckIssue("pack", f"pack {pid.hex()[:16]}: cannot be read: {exc}"))
            rep.damaged_blobs.update(e.id for e in expected)
            continue
        rep.bytes_read += len(data)
        rep.packs_read += 1
        rep.headers_checked += pid in indexed  # (compared below, or found unreadable)
        done += size
        if progress:
            progress(done, total)
        if blake3.blake3(data).digest() != pid:
            rep.add(CheckIssue("pack", f"pack {pid.hex()[:16]}: content does not match its name (damaged)"))
        try:
            header = {e.id: e for e in read_pack_entries(repo.env, data, name)}
        except DeltavaultError as exc:
            rep.add(CheckIssue("pack", f"pack {pid.hex()[:16]}: header unreadable: {exc}"))
            header = {}
        if pid in indexed and header:
            _disagree(pid, expected, header, rep)
        entries = expected if pid in indexed else list(header.values())
        mv = memoryview(data)
        for e in entries:
            rep.blobs_checked += 1
            try:
                if e.offset + e.length > len(data):
                    raise DeltavaultError("beyond the end of the pack (truncated)")
                plain = len(repo.open_blob(e.id, mv[e.offset:e.offset + e.length]))
                if plain != e.raw_length:  # restore and check --read-data go by the index's length
                    raise DeltavaultError(f"holds {plain} bytes, the index records {e.raw_length}")
            except DeltavaultError as exc:
                rep.damaged_blobs.add(e.id)
                rep.add(CheckIssue("blob", f"blob {e.id.hex()[:16]} in pack {pid.hex()[:16]}: {exc}"))


def _disagree(pid: bytes, expected: list[PackEntry], header: dict[bytes, PackEntry], rep: CheckReport) -> list[bytes]:
    """The blobs the index places in pack ``pid`` other than its ``header`` does (reported)."""
    out = []
    for e in expected:
        h = header.get(e.id)
        if h is None or (h.offset, h.length) != (e.offset, e.length):
            rep.add(CheckIssue("index", f"blob {e.id.hex()[:16]}: index and pack {pid.hex()[:16]} header disagree"))
            out.append(e.id)
    return out


def _check_headers(repo: Repository, packs: dict[bytes, int], rep: CheckReport) -> None:
    """Each pack's header against the index, read from the pack's end (``read_pack_header``,
    in one read of the span the index leaves after its last blob): a pack stored under
    another's name (two packs of one size swapped), or cut short, is found without reading
    its blobs. The blobs the header does not hold where the index says count as damaged (the
    snapshots they hit are traced). Reads run on a few threads (one request a pack on a
    remote store)."""
    by_pack = repo.index.entries_by_pack()
    ends = repo.index.pack_ends()

    def read(pid: bytes) -> list[PackEntry] | str:
        try:  # one read of what the index leaves after the blobs: the header and trailer
            return repo.read_pack_header(pid, packs[pid], packs[pid] - ends.get(pid, 0))
        except DeltavaultError as exc:
            return str(exc)

    with ThreadPoolExecutor(_HEADER_THREADS, thread_name_prefix="check-headers") as pool:
        for pid, got in zip(sorted(packs), pool.map(read, sorted(packs)), strict=True):
            rep.headers_read += 1
            rep.headers_checked += 1
            if isinstance(got, str):  # its blobs may be whole: --read-data says
                rep.add(CheckIssue("pack", f"pack {pid.hex()[:16]}: header unreadable: {got}"))
            else:
                rep.damaged_blobs.update(_disagree(pid, by_pack.get(pid, []), {e.id: e for e in got}, rep))


def _check_snapshots(repo: Repository, rep: CheckReport, bad: set[bytes], patches: PatchCheck | None) -> None:
    try:
        ids = repo.snapshot_ids()
    except DeltavaultError as exc:
        rep.add(CheckIssue("snapshot", f"cannot list snapshots: {exc}"))
        return
    seen_trees: dict[bytes, bool] = {}  # tree id -> fully good
    for sid in sorted(ids):
        rep.snapshots += 1
        try:
            snap = repo.load_snapshot(sid)
        except DeltavaultError as exc:
            rep.add(CheckIssue("snapshot", f"snapshot {short_id(sid)}: {exc}", snapshot=sid))
            rep.affected.setdefault(sid, []).append("(whole snapshot)")
            continue
        roots = [x for x in (snap.tree, snap.volume) if x]
        for root in roots:
            _check_tree(repo, rep, sid, root, b"", bad, seen_trees, patches, is_volume=root == snap.volume)


def _note(rep: CheckReport, sid: str, path: bytes, kind: str, msg: str) -> None:
    p = display(path) or "/"
    rep.add(CheckIssue(kind, f"snapshot {short_id(sid)}: {p}: {msg}", snapshot=sid, path=p))
    rep.affected.setdefault(sid, []).append(p)


def _check_tree(repo: Repository, rep: CheckReport, sid: str, tree_id: bytes, prefix: bytes,
                bad: set[bytes], seen: dict[bytes, bool], patches: PatchCheck | None, *,
                is_volume: bool = False) -> bool:
    """Whether everything below ``tree_id`` is present and sound. ``seen`` remembers
    subtrees found fully good, so a subtree shared by many snapshots is read once.
    Iterative (an explicit stack of open directories): a tree of any depth is checked."""
    if seen.get(tree_id) is True:
        return True
    if is_volume:
        # Volume manifests are META blobs; their own module checks block references.
        ok = tree_id in repo.index and tree_id not in bad
        if not ok:
            _note(rep, sid, b"(volume)", "missing", "volume manifest blob is missing or damaged")
        else:
            ok = check_volume_manifest(repo, rep, sid, tree_id, bad, patches)
        seen[tree_id] = ok
        return ok
    root = _Open(tree_id, prefix, _load_checked(repo, rep, sid, tree_id, prefix, bad))
    stack = [root]
    while stack:
        top = stack[-1]
        if top.i == len(top.nodes):  # every entry done: the directory's verdict goes up
            stack.pop()
            seen[top.tree_id] = top.ok
            if stack:
                stack[-1].ok &= top.ok
            continue
        n = top.nodes[top.i]
        top.i += 1
        path = top.path + b"/" + n.name if top.path else n.name
        if n.type == NodeType.DIR and n.subtree:
            if seen.get(n.subtree) is True:
                continue
            stack.append(_Open(n.subtree, path, _load_checked(repo, rep, sid, n.subtree, path, bad)))
            continue
        top.ok &= _check_node(repo, rep, sid, path, n, bad, patches)
    return root.ok


class _Open:
    """A directory being checked: its entries, the next one, and whether all so far are good."""

    __slots__ = ("i", "nodes", "ok", "path", "tree_id")

    def __init__(self, tree_id: bytes, path: bytes, nodes: list[Node] | None) -> None:
        self.tree_id, self.path = tree_id, path
        self.nodes = nodes or []
        self.ok = nodes is not None
        self.i = 0


def _load_checked(repo: Repository, rep: CheckReport, sid: str, tree_id: bytes, path: bytes,
                  bad: set[bytes]) -> list[Node] | None:
    """A directory's entries, or None (noted) when its listing is lost or unsafe to restore."""
    if tree_id not in repo.index or tree_id in bad:
        _note(rep, sid, path, "tree", "directory listing is missing or damaged; everything below is lost")
        return None
    try:
        nodes = load_nodes(repo, tree_id)
    except DeltavaultError as exc:
        _note(rep, sid, path, "tree", f"directory listing unreadable: {exc}")
        return None
    names: set[bytes] = set()
    for n in nodes:
        try:
            check_name(n.name)
        except CorruptionError as exc:
            _note(rep, sid, path, "tree", f"directory listing holds an unsafe name: {exc}")
            return None
        if n.name in names:
            _note(rep, sid, path, "tree", f"directory listing holds {display(n.name)} twice")
            return None
        names.add(n.name)
    return nodes


def _check_node(repo: Repository, rep: CheckReport, sid: str, path: bytes, n: Node, bad: set[bytes],
                patches: PatchCheck | None) -> bool:
    ok = True
    if n.type == NodeType.FILE and content_size(n.content) != n.size:
        ok = False
        _note(rep, sid, path, "tree", f"records {n.size} bytes but its content holds "
              f"{content_size(n.content)}; restore refuses the file")
    blob_ids = [b for r in n.content for b in ref_blob_ids(r)] + list(n.pages or [])
    lost = [b for b in blob_ids if b not in repo.index or b in bad]
    if lost:
        ok = False
        _note(rep, sid, path, "missing", f"{len(lost)} of its blobs are missing or damaged")
    if patches is not None:
        patches.prime(n.content)
    for r in n.content:
        if (fault := refused(repo, r, bad, patches)) is not None:
            ok = False
            _note(rep, sid, path, "tree", f"restore refuses its content: {fault}")
            break
    return ok
