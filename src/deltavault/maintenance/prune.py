"""Prune: remove data no snapshot references, in two phases (docs/design.md, "Retention,
prune and locking").

Plan, under a shared lock (backups keep running): mark every blob the current snapshots
reach, classify packs (keep / delete / repack), copy the live blobs of repack packs into
new packs and index those. Nothing is deleted and nothing is dropped from the index.

Sweep, under the exclusive lock (brief): walk only the snapshots that appeared since the
plan, down to trees the plan already knew to be live, and keep ("resurrect") any pack
holding a blob one of them uses; then write an index without the doomed packs that
supersedes every index file, delete those packs, then the superseded index files.

A backup that deduplicated against a doomed blob during the plan has finished (it held a
shared lock) before the sweep starts, so its snapshot is seen by the re-check; a backup
that opened the repository earlier but locks later refreshes its index on locking.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from deltavault.backends import retention
from deltavault.backends.base import unwrap
from deltavault.backends.s3errors import ObjectRetained
from deltavault.errors import CorruptionError, DeltavaultError, RepositoryLocked
from deltavault.maintenance.reachable import Bitmap, Marker
from deltavault.repository.index import Index
from deltavault.repository.pack import PackEntry, pack_name
from deltavault.repository.packwriter import PackWriter
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id

# Entries per index file the sweep writes, to bound the memory of encoding one.
INDEX_CHUNK = 100_000
# A temporary file untouched this long belongs to a write that died (a live writer keeps
# touching it); removing one only costs a stalled writer its put, never stored data.
TEMP_GRACE = 3600.0


@runtime_checkable
class TempFiles(Protocol):
    def remove_temp_files(self, older_than: float, *, dry_run: bool = False) -> tuple[int, int]: ...


@dataclass
class PruneOptions:
    repack_threshold: float = 0.2  # repack a pack once this share of its bytes is unused
    dry_run: bool = False
    lock_wait: float = 0.0  # how long the sweep waits for the exclusive lock


@dataclass
class PackUse:
    size: int = 0  # bytes on disk (0: indexed but missing)
    used: int = 0
    unused: int = 0
    used_bytes: int = 0
    unused_bytes: int = 0


@dataclass
class PruneReport:
    snapshots: int = 0
    blobs: int = 0
    blobs_used: int = 0
    packs: int = 0
    orphans_adopted: int = 0
    packs_delete: int = 0
    packs_repack: int = 0
    packs_written: int = 0
    packs_resurrected: int = 0
    packs_deleted: int = 0
    bytes_freed: int = 0  # pack bytes removed minus bytes of new packs written
    bytes_unused_kept: int = 0  # unused bytes left in packs under the threshold
    blobs_repacked: int = 0
    damaged_skipped: list[str] = field(default_factory=list)  # packs left alone: unreadable blobs
    index_files_written: int = 0
    index_files_removed: int = 0
    new_snapshots_rechecked: int = 0
    plan_seconds: float = 0.0
    exclusive_seconds: float = 0.0
    packs_retained: int = 0  # unused, but under S3 Object Lock retention: kept for a later prune
    retained_until: str = ""  # the latest end of their retention (ISO 8601)
    index_files_retained: int = 0  # superseded, but under retention: left until it ends
    temp_files_removed: int = 0  # left by killed writers (dry run: would be removed)
    temp_bytes_removed: int = 0
    dry_run: bool = False


@dataclass
class Plan:
    snapshots: set[str]
    n: int  # index positions covered by the bitmaps
    used: Bitmap
    doomed: Bitmap  # unavailable once doomed packs are gone
    delete: set[bytes]  # packs with no used blob
    repack: set[bytes]  # packs whose live blobs were copied
    repacked: list[tuple[bytes, list[PackEntry]]] = field(default_factory=list)
    sizes: dict[bytes, int] = field(default_factory=dict)
    # Bitmap positions stay valid while this very Index object only grows; a rebuild
    # (after another prune or repair) replaces it.
    index: Index | None = None

    @property
    def doomed_packs(self) -> set[bytes]:
        return self.delete | self.repack


Progress = Callable[[str], None]


def prune(repo: Repository, opts: PruneOptions | None = None, *, progress: Progress | None = None,
          command: str = "prune") -> PruneReport:
    opts = opts or PruneOptions()
    say = progress or (lambda _msg: None)
    rep = PruneReport(dry_run=opts.dry_run)
    t0 = time.monotonic()
    with repo.lock(command=f"{command} (plan)", wait=opts.lock_wait):
        plan = make_plan(repo, opts, rep, say)
        backend = unwrap(repo.backend)
        if isinstance(backend, TempFiles):
            rep.temp_files_removed, rep.temp_bytes_removed = backend.remove_temp_files(
                TEMP_GRACE, dry_run=opts.dry_run)
    rep.plan_seconds = time.monotonic() - t0
    if opts.dry_run or not plan.doomed_packs:
        return rep
    say("waiting for the exclusive lock")
    try:
        lk = repo.lock(exclusive=True, command=f"{command} (sweep)", wait=opts.lock_wait)
    except RepositoryLocked as exc:
        raise RepositoryLocked(f"{exc.message}. Prune planned (and wrote {rep.packs_written} repacked "
                               "pack(s), harmless duplicates) but deleted nothing: run it again when no "
                               "backup is running, or with --lock-wait") from exc
    with lk:
        t1 = time.monotonic()
        sweep(repo, plan, rep, say, still_held=lk.still_held)
        rep.exclusive_seconds = time.monotonic() - t1
    # The plan holds the old Index: dropped first, or the rebuild below holds two full
    # indexes at once (10M blobs: 1.7 GiB peak instead of 0.8, measured).
    del plan
    repo.refresh_index(force=True)  # outside the exclusive lock: backups may go on meanwhile
    return rep


def make_plan(repo: Repository, opts: PruneOptions, rep: PruneReport, say: Progress) -> Plan:
    if not opts.dry_run:
        rep.orphans_adopted = repo.adopt_orphan_packs()
    index = repo.index
    snaps = repo.snapshot_ids()
    rep.snapshots = len(snaps)
    n = len(index)
    rep.blobs = n
    used = Bitmap(n)
    marker = Marker(repo, used)
    say(f"marking blobs used by {len(snaps)} snapshots")
    for sid in snaps:
        try:
            snap = repo.load_snapshot(sid)
        except DeltavaultError as exc:
            raise CorruptionError(f"snapshot {short_id(sid)} cannot be read ({exc}); run 'deltavault check' "
                                  "and 'deltavault repair' first. Nothing was deleted") from exc
        marker.mark_snapshot(sid, snap)
    if marker.missing:
        raise CorruptionError(f"{len(marker.missing)} blob(s) that snapshots reference are missing from the index; "
                              "run 'deltavault check' and 'deltavault repair' first. Nothing was deleted")
    rep.blobs_used = used.count()
    on_disk = repo.list_pack_names()
    uses: dict[bytes, PackUse] = {pid: PackUse(size=on_disk.get(pid, 0)) for pid in index.packs()}
    for _bid, pid, e, pos in index.iter_records():
        u = uses[pid]
        if used[pos]:
            u.used += 1
            u.used_bytes += e.length
        else:
            u.unused += 1
            u.unused_bytes += e.length
    rep.packs = len(uses)
    delete: set[bytes] = set()
    repack: set[bytes] = set()
    for pid, u in uses.items():
        if u.used == 0:
            delete.add(pid)
        elif u.size == 0:
            raise CorruptionError(f"pack {pid.hex()[:16]} holds used blobs but is missing; run 'deltavault "
                                  "repair' first. Nothing was deleted")
        elif u.unused and (u.size - u.used_bytes) >= opts.repack_threshold * u.size:
            repack.add(pid)
        else:
            rep.bytes_unused_kept += u.unused_bytes
    _keep_retained(repo, delete, repack, uses, rep)
    plan = Plan(set(snaps), n, used, Bitmap(n), delete, repack, sizes={p: u.size for p, u in uses.items()},
                index=index)
    rep.packs_delete, rep.packs_repack = len(delete), len(repack)
    if not opts.dry_run and repack:
        say(f"repacking {len(repack)} partly used packs")
        _repack(repo, plan, rep)
    for _bid, pid, _e, pos in index.iter_records():
        if pos < n and pid in plan.doomed_packs and not used[pos]:
            plan.doomed.set(pos)
    rep.bytes_freed = sum(uses[p].size for p in plan.doomed_packs) - sum(
        _pack_bytes(e) for _p, e in plan.repacked)
    if opts.dry_run:
        rep.bytes_freed = sum(uses[p].size for p in plan.doomed_packs) - sum(uses[p].used_bytes for p in repack)
    return plan


def _keep_retained(repo: Repository, delete: set[bytes], repack: set[bytes], uses: dict[bytes, PackUse],
                   rep: PruneReport) -> None:
    """Packs under Object Lock retention (immutable repositories on S3) cannot be deleted
    yet: keep them whole and indexed, and say until when."""
    retained = retention.still_retained(repo.backend, [pack_name(p) for p in sorted(delete | repack)])
    for name, until in retained.items():
        pid = bytes.fromhex(name.rsplit("/", 1)[-1])
        delete.discard(pid)
        repack.discard(pid)
        rep.packs_retained += 1
        rep.bytes_unused_kept += uses[pid].unused_bytes
        rep.retained_until = max(rep.retained_until, until.isoformat())


def _pack_bytes(entries: list[PackEntry]) -> int:
    return sum(e.length for e in entries)


def _repack(repo: Repository, plan: Plan, rep: PruneReport) -> None:
    """Copy the live blobs of repack packs, sealed bytes as they are, into new packs."""
    live: dict[bytes, list[PackEntry]] = {pid: [] for pid in plan.repack}
    for _bid, pid, e, pos in repo.index.iter_records():
        if pid in live and plan.used[pos]:
            live[pid].append(e)
    writer = PackWriter(repo)
    for old in sorted(live):
        entries = sorted(live[old], key=lambda e: e.offset)
        try:
            data = repo.backend.get(pack_name(old))
            sealed = [data[e.offset:e.offset + e.length] for e in entries]
            for e, s in zip(entries, sealed):
                repo.open_blob(e.id, s)  # never copy damage into a fresh pack
        except DeltavaultError as exc:
            plan.repack.discard(old)
            rep.damaged_skipped.append(f"{old.hex()[:16]}: {exc}")
            continue
        for e, s in zip(entries, sealed):
            writer.add(e.type, e.id, s, e.raw_length)
            rep.blobs_repacked += 1
    written = writer.finish()
    if written:
        # Indexed at once (additively), so a crash before the sweep leaves duplicates, not orphans.
        repo.write_index_file(written)
    plan.repacked = written
    rep.packs_written = len(written)


def sweep(repo: Repository, plan: Plan, rep: PruneReport, say: Progress,
          still_held: Callable[[], bool]) -> None:
    if repo.index is not plan.index:
        raise RepositoryLocked("the index was rebuilt by another prune or repair while this one planned; "
                               "nothing was deleted, run prune again", retryable=True)
    index = repo.index
    current = set(repo.snapshot_ids())
    fresh = sorted(current - plan.snapshots)
    rep.new_snapshots_rechecked = len(fresh)
    keep: set[bytes] = set()
    if fresh:
        say(f"re-checking {len(fresh)} snapshot(s) saved while planning")
        seen = Bitmap(len(index))

        def on_blob(_bid: bytes, pos: int) -> None:
            if pos < plan.n and plan.doomed[pos]:
                loc = index.lookup(_bid)
                if loc is not None:
                    keep.add(loc.pack_id)

        def skip_tree(pos: int) -> bool:
            return (pos < plan.n and plan.used[pos]) or seen[pos]

        marker = Marker(repo, seen, on_blob=on_blob, skip_tree=skip_tree)
        for sid in fresh:
            marker.mark_snapshot(sid, repo.load_snapshot(sid))
    rep.packs_resurrected = len(keep & plan.doomed_packs)
    gone = plan.doomed_packs - keep
    if not gone:
        return
    if not still_held():
        raise RepositoryLocked("prune lost its exclusive lock; nothing was deleted", retryable=True)
    old_files = repo.index_names()
    _write_index(repo, plan, gone, old_files, rep)
    for pid in sorted(gone):
        repo.backend.delete(pack_name(pid))
        rep.packs_deleted += 1
    for name in old_files:
        try:
            repo.backend.delete(name)
        except ObjectRetained:
            rep.index_files_retained += 1  # superseded, so ignored; removed by a prune after it ends
            continue
        rep.index_files_removed += 1
    repo.cache.prune("index", set(repo.index_names()))
    rep.bytes_freed = sum(plan.sizes.get(p, 0) for p in gone) - sum(_pack_bytes(e) for p, e in plan.repacked)


def _write_index(repo: Repository, plan: Plan, gone: set[bytes], old_files: list[str],
                 rep: PruneReport) -> None:
    """One index for everything kept, in chunks; only the last chunk supersedes the old
    files, so a crash part way leaves extra (duplicate) entries, never missing ones."""
    repacked_ids = {pid for pid, _ in plan.repacked}
    groups: dict[bytes, list[PackEntry]] = {}
    count = 0

    def flush(final: bool) -> None:
        nonlocal groups, count
        packs = list(groups.items())
        groups, count = {}, 0
        if packs or final:
            repo.write_index_file(packs, supersedes=old_files if final else ())
            rep.index_files_written += 1

    for _bid, pid, e, _pos in repo.index.iter_records():
        if pid in gone or pid in repacked_ids:
            continue
        groups.setdefault(pid, []).append(e)
        count += 1
        if count >= INDEX_CHUNK:
            flush(False)
    for pid, entries in plan.repacked:
        groups.setdefault(pid, []).extend(entries)
        count += len(entries)
        if count >= INDEX_CHUNK:
            flush(False)
    flush(True)
