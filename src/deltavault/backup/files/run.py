"""One file backup run: choose what to compare against, archive, save the snapshot,
then update the catalog."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deltavault.backup.files.archiver import FileArchiver
from deltavault.backup.files.catalog import Catalog, open_catalog
from deltavault.backup.files.catalog_writer import CatalogWriter
from deltavault.backup.files.options import FileBackupOptions, FileStats, Problem, Store
from deltavault.backup.files.previous import (
    CatalogPrevious,
    NoPrevious,
    PreviousState,
    TreePrevious,
)
from deltavault.backup.files.scan import scan_totals, start_scanner
from deltavault.backup.files.sources import plan_sources
from deltavault.chunking.cdc import CdcParams, Chunker
from deltavault.errors import DeltavaultError, UsageError
from deltavault.fs.mounts import SNAPSHOT_DIR
from deltavault.fs.paths import display
from deltavault.model.snapshot import INCOMPLETE_MAX, Rejection, Snapshot, SnapshotSummary
from deltavault.model.types import BlobType
from deltavault.objects.diff import diff_trees
from deltavault.progress import NullReporter, Reporter
from deltavault.repository.hosttag import HostTagger, own_parent
from deltavault.repository.packcheck import PackCheck
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import new_snapshot
from deltavault.repository.status import failures_recorded


@dataclass
class BackupRequest:
    paths: list[str]  # what to read
    logical_paths: list[str] | None = None  # what to record (--as, or the path before a snapshot)
    source_id: str | None = None
    hostname: str = field(default_factory=socket.gethostname)
    tags: list[str] = field(default_factory=list)
    parent: str | None = None
    options: FileBackupOptions = field(default_factory=FileBackupOptions)
    use_catalog: bool = True
    snapshot: str = "none"  # auto | btrfs | lvm | vss | none: read from a point-in-time snapshot
    dry_run: bool = False  # read and hash everything, write nothing
    skip_if_unchanged: bool = False  # save no snapshot when the tree equals the parent's
    # Sources left out before the run (run_backup: a path that is not UTF-8), reported with
    # the missing ones.
    left_out: list[Problem] = field(default_factory=list)


@dataclass
class BackupResult:
    snapshot_id: str | None  # None: none saved (dry_run, skipped)
    snapshot: Snapshot
    stats: FileStats
    problems: list[Problem]
    change_source: str  # catalog | parent-trees | none
    parent: str | None
    bytes_added: int
    bytes_downloaded: int
    seconds: float
    snapshots: list[dict[str, str]] = field(default_factory=list)  # point-in-time sources used
    dry_run: bool = False
    skipped: bool = False  # --skip-if-unchanged found nothing changed: no snapshot saved
    packs: PackCheck = field(default_factory=PackCheck)  # missing or truncated packs found at the start

    @property
    def partial(self) -> bool:
        return any(p.partial for p in self.problems)


def default_source_id(hostname: str, logical_paths: list[str]) -> str:
    return f"{hostname}:" + "\n".join(sorted(logical_paths))


def chunker_for(repo: Repository) -> Chunker:
    c = repo.config.chunker
    seed = repo.master.chunker_seed() if repo.master else 0
    return Chunker(CdcParams(c.min, c.avg, c.max, seed))


def _choose_previous(repo: Repository, catalog: Catalog | None, source_id: str,
                     parent: str | None, tagger: HostTagger, *,
                     trust: bool = True) -> tuple[PreviousState, list[Rejection]]:
    """What the run compares with, and the parents passed over and why. ``trust``: false when
    blobs were dropped from the index (missing packs): then every reused reference is looked
    up, and a file whose blobs are gone is read again. With no catalog, a parent found in the
    repository is one this host wrote (``tagger``): another host that shares the repository
    could plant one whose trees name its own content under this host's files' size and
    times. An explicit ``parent`` is the user's choice and is trusted."""
    existing = set(repo.snapshot_ids())
    if parent is None and catalog is not None:
        state = catalog.source_state(source_id)
        sid_now = None if state is None else state.snapshot if state.snapshot in existing else \
            _replacement(repo, state.snapshot)
        if state is not None and sid_now is not None:
            # The catalog describes files on disk and the blobs that hold them, not the
            # snapshot, so it stays good for a snapshot that tag or rewrite replaced.
            trusted = trust and bool(state.index_files) and state.index_files <= repo.live_index_files()
            return CatalogPrevious(catalog, source_id, sid_now, state.run_start_ns,
                                   blobs_trusted=trusted), []
    rejected: list[Rejection] = []
    if parent is not None:
        sid, snap = repo.resolve_snapshot(parent)
    else:
        candidates = [s for s in repo.list_snapshots() if s[1].source_id == source_id and s[1].tree]
        found, why = own_parent(tagger, candidates)
        rejected = [Rejection(source="parent-trees", reason=why)] if why else []
        if found is None:
            return NoPrevious(), rejected
        sid, snap = found
    if snap.tree is None:
        return NoPrevious(), rejected
    return TreePrevious(repo, snap.tree, sid, snap.time_ns), rejected


def _replacement(repo: Repository, sid: str) -> str | None:
    """The newest snapshot that replaced ``sid`` (tag, rewrite: ``Snapshot.original``)."""
    found = [x for x, snap in repo.list_snapshots() if snap.original == sid]
    return found[-1] if found else None


def run_backup(repo: Repository, req: BackupRequest, reporter: Reporter | None = None,
               catalog_path: Path | None = None) -> BackupResult:
    """Back up ``req.paths``; with ``req.snapshot`` other than "none", each path is read from
    a point-in-time snapshot of its volume (removed afterwards, also on errors), while the
    snapshot records, and the catalog matches on, the original paths. A run that fails is
    recorded in the repository's status records (reports show it), as far as it can be."""
    req = _recordable(req)
    if req.dry_run:  # writes nothing to the repository, not even a record of failing
        return _run_from(repo, req, reporter, catalog_path)
    logical = req.logical_paths or [os.path.abspath(p) for p in req.paths]
    with failures_recorded(repo, snapshot_kind="files", paths=logical, hostname=req.hostname,
                           source_id=req.source_id or default_source_id(req.hostname, logical)):
        return _run_from(repo, req, reporter, catalog_path)


def _recordable(req: BackupRequest) -> BackupRequest:
    """A snapshot records its sources' paths as text (and the catalog keys on them), so a
    source whose path is not UTF-8 cannot be one: it is left out and reported, and the run
    is partial, as for a missing source (a name in a --files-from-raw list, from ``find
    -print0`` over a tree where anyone makes names, ended the run with a traceback). Its
    parent directory backs it up, as any name below a source is stored as raw bytes."""
    logical = req.logical_paths or [os.path.abspath(p) for p in req.paths]
    bad = [i for i, lp in enumerate(logical) if not _is_text(lp)]
    if not bad:
        return req
    if len(bad) == len(logical):
        raise UsageError("no source can be recorded: " + ", ".join(display(os.fsencode(lp)) for lp in logical)
                         + ": a source's path must be UTF-8 (back up its parent directory)")
    keep = [i for i in range(len(logical)) if i not in set(bad)]
    left = [Problem(display(os.fsencode(logical[i])), "missing",
                    "the path is not UTF-8, which a snapshot cannot record as a source; not backed up "
                    "(back up its parent directory)") for i in bad]
    return dataclasses.replace(req, paths=[req.paths[i] for i in keep],
                               logical_paths=[logical[i] for i in keep] if req.logical_paths else None,
                               left_out=[*req.left_out, *left])


def _is_text(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _run_from(repo: Repository, req: BackupRequest, reporter: Reporter | None,
              catalog_path: Path | None) -> BackupResult:
    if req.snapshot == "none":
        return _run(repo, req, reporter, catalog_path, [])
    from deltavault.snapshot import take_snapshot

    logical = req.logical_paths or [os.path.abspath(p) for p in req.paths]
    with contextlib.ExitStack() as stack:
        # a missing path has no volume to snapshot: it goes on as given and is reported missing
        handles = {p: stack.enter_context(take_snapshot(os.path.abspath(p), req.snapshot))
                   for p in req.paths if os.path.lexists(p)}
        # a snapshot shows the (then empty) folder that holds snapshots: not user data
        opts = dataclasses.replace(req.options, excludes=[*req.options.excludes, SNAPSHOT_DIR])
        inner = dataclasses.replace(req, paths=[handles[p].source_path if p in handles else p for p in req.paths],
                                    logical_paths=logical, options=opts)
        info = [{"path": h.original_path, "kind": h.kind, "snapshot": h.ident, "note": h.note}
                for h in handles.values()]
        return _run(repo, inner, reporter, catalog_path, info)


def _run(repo: Repository, req: BackupRequest, reporter: Reporter | None, catalog_path: Path | None,
         snapshots: list[dict[str, str]]) -> BackupResult:
    reporter = reporter or NullReporter()
    t0 = time.monotonic()
    start_ns = time.time_ns()
    raw0 = repo.write_stats.bytes_added_raw
    logical = req.logical_paths or [os.path.abspath(p) for p in req.paths]
    source_id = req.source_id or default_source_id(req.hostname, logical)
    sources, kept, missing = plan_sources(req.paths, logical)
    missing = req.left_out + missing
    for m in missing:
        reporter.problem(m.path, m.kind, m.message)
    catalog = None
    notes: list[Problem] = []  # the catalog is a cache: trouble with it costs speed, not the run
    cat_path = catalog_path or (repo.cache_dir / "catalog.sqlite" if repo.cache_dir is not None else None)
    if req.use_catalog and cat_path is not None and not req.dry_run:
        catalog, note = open_catalog(cat_path, key=repo.cache_key("catalog"), blob_id=repo.blob_id)
        for text in (note, catalog.note if catalog is not None else ""):
            if text:
                notes.append(Problem(str(cat_path), "catalog", text, partial=False))
    try:
        # Packs of an interrupted run are reused from here on; blobs of missing ones are not.
        packs = PackCheck() if req.dry_run else repo.check_packs()
        if packs.warning():
            notes.append(Problem(repo.backend.location(), "repository", packs.warning(), partial=False))
        tagger = HostTagger.for_repository(repo)
        if tagger.note:
            notes.append(Problem("host secret", "host secret", tagger.note, partial=False))
        previous: PreviousState = NoPrevious()
        rejected: list[Rejection] = []
        if not req.options.read_all:
            previous, rejected = _choose_previous(repo, catalog, source_id, req.parent, tagger,
                                                  trust=not packs.dropped)
        writer = CatalogWriter(catalog, source_id) if catalog is not None else None
        opts = req.options
        if repo.backend.location():
            opts.skip_paths = set(opts.skip_paths) | {os.fsencode(os.path.abspath(repo.backend.location()))}
            if repo.cache_dir is not None:
                opts.skip_paths.add(os.fsencode(os.path.abspath(repo.cache_dir)))
        page_key = repo.master.mac if repo.master else None
        store: Store = DryRunStore(repo) if req.dry_run else repo
        archiver = FileArchiver(store, chunker_for(repo), previous, reporter, opts,
                                page_key=page_key, catalog=writer)
        reporter.start("backup")
        if reporter.wants_totals:
            start_scanner(sources, opts, reporter)
        root = archiver.run(sources)
        reporter.finish()
        st = archiver.stats
        problems = missing + archiver.problems
        added = store.bytes_added if isinstance(store, DryRunStore) else repo.write_stats.bytes_written
        # Taken before the snapshot is written, so it cannot count the snapshot itself: the
        # printed summary and the stored one say the same (docs/user-guide.md, "added").
        summary = SnapshotSummary(
            files_new=st.files_new, files_changed=st.files_changed, files_unmodified=st.files_unmodified,
            dirs=st.dirs, bytes_processed=st.bytes_read, bytes_total=st.bytes_total,
            bytes_added=added, bytes_downloaded=repo.traffic.bytes_read,
            blobs_added=store.blobs_added if isinstance(store, DryRunStore) else repo.write_stats.blobs_added,
            errors=sum(1 for p in problems if p.partial),
            incomplete=[p.path for p in problems if p.partial][:INCOMPLETE_MAX],
            seconds=round(time.monotonic() - t0, 3), change_source=previous.kind, rejected=rejected,
            bytes_added_raw=repo.write_stats.bytes_added_raw - raw0)
        snap = tagger.sign(new_snapshot(start_ns=start_ns, hostname=req.hostname, kind="files", paths=kept,
                                        source_id=source_id, tree=root, parent=previous.snapshot_id,
                                        tags=req.tags, summary=summary))
        result = BackupResult(None, snap, st, problems + notes, previous.kind, previous.snapshot_id,
                              summary.bytes_added, summary.bytes_downloaded, time.monotonic() - t0, snapshots,
                              dry_run=req.dry_run, packs=packs)
        if req.dry_run:
            return result
        if req.skip_if_unchanged and _same_as_parent(repo, previous, root):
            result.skipped = True
            return result
        result.snapshot_id = repo.save_snapshot(snap)
        if catalog is not None:
            notes += _update_catalog(repo, catalog, writer, result.snapshot_id, start_ns, archiver.page_blob_ids,
                                     cat_path)
            result.problems = problems + notes
        return result
    finally:
        if catalog is not None:
            catalog.close()


def _same_as_parent(repo: Repository, previous: PreviousState, root: bytes) -> bool:
    """--skip-if-unchanged: the run found what the parent holds: no entry added, removed or
    changed in content or metadata, access times aside (listing a directory changes its own)."""
    if previous.snapshot_id is None:
        return False
    try:
        parent = repo.load_snapshot(previous.snapshot_id).tree
        return parent is not None and next(iter(diff_trees(repo, parent, root)), None) is None
    except DeltavaultError:
        return False


def _update_catalog(repo: Repository, catalog: Catalog, writer: CatalogWriter | None, sid: str, start_ns: int,
                    page_blob_ids: set[bytes], cat_path: Path | None) -> list[Problem]:
    """Record this run in the local catalog (after the snapshot: a crash in between costs
    the next run a re-read, never a wrong reuse). Trouble only costs speed, so it is noted."""
    notes = []
    rejected = catalog.rejection_note()
    if catalog.damaged:
        damage, writer = catalog.damaged, None
        try:
            catalog.discard()
            what = "removed it; the next run starts a new one"
        except OSError as exc:
            what = f"could not remove it ({exc})"
        notes.append(Problem(str(cat_path), "catalog", f"the local catalog is damaged ({damage}): the files "
                             f"it could not answer for were read again, and deltavault {what}", partial=False))
    if writer is not None:
        try:
            writer.commit(sid, start_ns, keep_blobs=page_blob_ids, index_files=repo.live_index_files())
        except (sqlite3.Error, OSError) as exc:
            notes.append(Problem(str(writer.catalog.path), "catalog", "the snapshot is saved, but the "
                                 f"local catalog could not be updated ({exc}); the next run compares "
                                 "with older data and reads more", partial=False))
    if rejected:
        notes.append(Problem(str(cat_path), "catalog", rejected, partial=False))
    return notes


class DryRunStore:
    """--dry-run: blobs are hashed and counted (their size before compression) but never
    written, so nothing in the repository or the local catalog changes."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.seen: set[bytes] = set()
        self.bytes_added = 0
        self.blobs_added = 0
        self._lock = threading.Lock()

    def save_blob(self, btype: BlobType, data: bytes | memoryview, *, blob_id: bytes | None = None,
                  level: int | None = None, compress: bool = True) -> tuple[bytes, int]:
        return self._count([data], [blob_id if blob_id is not None else self.repo.blob_id(data)])[0]

    def save_blobs(self, btype: BlobType, items: Sequence[bytes | memoryview], *, level: int | None = None,
                   compress: bool = True) -> list[tuple[bytes, int]]:
        """The batched path a real run takes (objects/store.py save_many): one lock a batch."""
        return self._count(items, [self.repo.blob_id(x) for x in items])

    def _count(self, items: Sequence[bytes | memoryview], ids: list[bytes]) -> list[tuple[bytes, int]]:
        out = []
        with self._lock:
            for bid, data in zip(ids, items):
                if bid in self.seen or self.repo.has_blob(bid):
                    out.append((bid, 0))
                    continue
                self.seen.add(bid)
                self.bytes_added += len(data)
                self.blobs_added += 1
                out.append((bid, len(data)))
        return out

    def has_blob(self, blob_id: bytes) -> bool:
        return blob_id in self.seen or self.repo.has_blob(blob_id)

    def blob_id(self, data: bytes | memoryview) -> bytes:
        return self.repo.blob_id(data)

    def flush(self) -> None:
        pass


__all__ = ["BackupRequest", "BackupResult", "DryRunStore", "chunker_for", "default_source_id", "run_backup",
           "scan_totals"]
