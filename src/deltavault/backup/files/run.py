"""One file backup run: choose what to compare against, archive, save the snapshot,
then update the catalog."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deltavault.backup.files.archiver import FileArchiver
from deltavault.backup.files.catalog import Catalog, open_catalog
from deltavault.backup.files.catalog_writer import CatalogWriter
from deltavault.backup.files.options import Excludes, FileBackupOptions, FileStats, Problem, Source
from deltavault.backup.files.previous import (
    CatalogPrevious,
    NoPrevious,
    PreviousState,
    TreePrevious,
)
from deltavault.chunking.cdc import CdcParams, Chunker
from deltavault.errors import UsageError
from deltavault.fs.mounts import SNAPSHOT_DIR
from deltavault.model.snapshot import INCOMPLETE_MAX, Snapshot, SnapshotSummary
from deltavault.progress import NullReporter, Reporter
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


@dataclass
class BackupResult:
    snapshot_id: str
    snapshot: Snapshot
    stats: FileStats
    problems: list[Problem]
    change_source: str  # catalog | parent-trees | none
    parent: str | None
    bytes_added: int
    bytes_downloaded: int
    seconds: float
    snapshots: list[dict[str, str]] = field(default_factory=list)  # point-in-time sources used

    @property
    def partial(self) -> bool:
        return any(p.partial for p in self.problems)


def default_source_id(hostname: str, logical_paths: list[str]) -> str:
    return f"{hostname}:" + "\n".join(sorted(logical_paths))


def chunker_for(repo: Repository) -> Chunker:
    c = repo.config.chunker
    seed = repo.master.chunker_seed() if repo.master else 0
    return Chunker(CdcParams(c.min, c.avg, c.max, seed))


def _sources(paths: list[str], logical: list[str]) -> list[Source]:
    out = []
    names: set[bytes] = set()
    for p, lp in zip(paths, logical, strict=True):
        name = os.fsencode(os.path.basename(os.path.normpath(lp))) or b"root"
        if name in (b".", b".."):
            name = os.fsencode(os.path.basename(os.path.abspath(lp))) or b"root"
        if name in names:
            raise UsageError(f"two sources share the name {os.fsdecode(name)!r}; back them up separately or use --as")
        names.add(name)
        out.append(Source(os.fsencode(os.path.abspath(p)), name))
    return out


def _choose_previous(repo: Repository, catalog: Catalog | None, source_id: str,
                     parent: str | None) -> PreviousState:
    existing = set(repo.snapshot_ids())
    if parent is None and catalog is not None:
        state = catalog.source_state(source_id)
        if state is not None and state.snapshot in existing:
            trusted = bool(state.index_files) and state.index_files <= repo.live_index_files()
            return CatalogPrevious(catalog, source_id, state.snapshot, state.run_start_ns,
                                   blobs_trusted=trusted)
    if parent is not None:
        sid, snap = repo.resolve_snapshot(parent)
    else:
        candidates = [s for s in repo.list_snapshots() if s[1].source_id == source_id and s[1].tree]
        if not candidates:
            return NoPrevious()
        sid, snap = candidates[-1]
    if snap.tree is None:
        return NoPrevious()
    return TreePrevious(repo, snap.tree, sid, snap.time_ns)


def run_backup(repo: Repository, req: BackupRequest, reporter: Reporter | None = None,
               catalog_path: Path | None = None) -> BackupResult:
    """Back up ``req.paths``; with ``req.snapshot`` other than "none", each path is read from
    a point-in-time snapshot of its volume (removed afterwards, also on errors), while the
    snapshot records, and the catalog matches on, the original paths. A run that fails is
    recorded in the repository's status records (reports show it), as far as it can be."""
    logical = req.logical_paths or [os.path.abspath(p) for p in req.paths]
    with failures_recorded(repo, snapshot_kind="files", paths=logical, hostname=req.hostname,
                           source_id=req.source_id or default_source_id(req.hostname, logical)):
        return _run_from(repo, req, reporter, catalog_path)


def _run_from(repo: Repository, req: BackupRequest, reporter: Reporter | None,
              catalog_path: Path | None) -> BackupResult:
    if req.snapshot == "none":
        return _run(repo, req, reporter, catalog_path, [])
    from deltavault.snapshot import take_snapshot

    logical = req.logical_paths or [os.path.abspath(p) for p in req.paths]
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(take_snapshot(os.path.abspath(p), req.snapshot)) for p in req.paths]
        # a snapshot shows the (then empty) folder that holds snapshots: not user data
        opts = dataclasses.replace(req.options, excludes=[*req.options.excludes, SNAPSHOT_DIR])
        inner = dataclasses.replace(req, paths=[h.source_path for h in handles], logical_paths=logical,
                                    options=opts)
        info = [{"path": h.original_path, "kind": h.kind, "snapshot": h.ident, "note": h.note} for h in handles]
        return _run(repo, inner, reporter, catalog_path, info)


def _run(repo: Repository, req: BackupRequest, reporter: Reporter | None, catalog_path: Path | None,
         snapshots: list[dict[str, str]]) -> BackupResult:
    reporter = reporter or NullReporter()
    t0 = time.monotonic()
    start_ns = time.time_ns()
    raw0 = repo.write_stats.bytes_added_raw
    logical = req.logical_paths or [os.path.abspath(p) for p in req.paths]
    sources = _sources(req.paths, logical)
    source_id = req.source_id or default_source_id(req.hostname, logical)
    for p in req.paths:
        if not os.path.lexists(p):
            raise UsageError(f"source {p!r} does not exist")
    catalog = None
    notes: list[Problem] = []  # the catalog is a cache: trouble with it costs speed, not the run
    cat_path = catalog_path or (repo.cache_dir / "catalog.sqlite" if repo.cache_dir is not None else None)
    if req.use_catalog and cat_path is not None:
        catalog, note = open_catalog(cat_path, key=repo.cache_key("catalog"), blob_id=repo.blob_id)
        for text in (note, catalog.note if catalog is not None else ""):
            if text:
                notes.append(Problem(str(cat_path), "catalog", text, partial=False))
    try:
        if repo.adopt_orphan_packs():
            pass  # packs of an interrupted run are reused from here on
        previous: PreviousState = NoPrevious() if req.options.read_all else _choose_previous(
            repo, catalog, source_id, req.parent)
        writer = CatalogWriter(catalog, source_id) if catalog is not None else None
        opts = req.options
        if repo.backend.location():
            opts.skip_paths = set(opts.skip_paths) | {os.fsencode(os.path.abspath(repo.backend.location()))}
            if repo.cache_dir is not None:
                opts.skip_paths.add(os.fsencode(os.path.abspath(repo.cache_dir)))
        page_key = repo.master.mac if repo.master else None
        archiver = FileArchiver(repo, chunker_for(repo), previous, reporter, opts,
                                page_key=page_key, catalog=writer)
        reporter.start("backup")
        if reporter.wants_totals:
            _start_scanner(sources, opts, reporter)
        root = archiver.run(sources)
        reporter.finish()
        st = archiver.stats
        traffic = repo.traffic
        summary = SnapshotSummary(
            files_new=st.files_new, files_changed=st.files_changed, files_unmodified=st.files_unmodified,
            dirs=st.dirs, bytes_processed=st.bytes_read, bytes_total=st.bytes_total,
            bytes_added=repo.write_stats.bytes_written, bytes_downloaded=traffic.bytes_read,
            blobs_added=repo.write_stats.blobs_added,
            errors=sum(1 for p in archiver.problems if p.partial),
            incomplete=[p.path for p in archiver.problems if p.partial][:INCOMPLETE_MAX],
            seconds=round(time.monotonic() - t0, 3), change_source=previous.kind,
            bytes_added_raw=repo.write_stats.bytes_added_raw - raw0)
        snap = new_snapshot(start_ns=start_ns, hostname=req.hostname, kind="files", paths=logical,
                            source_id=source_id, tree=root, parent=previous.snapshot_id, tags=req.tags,
                            summary=summary)
        sid = repo.save_snapshot(snap)
        rejected = catalog.rejection_note() if catalog is not None else ""
        if catalog is not None and catalog.damaged:
            damage, writer = catalog.damaged, None
            try:
                catalog.discard()
                what = "removed it; the next run starts a new one"
            except OSError as exc:
                what = f"could not remove it ({exc})"
            catalog = None
            notes.append(Problem(str(cat_path), "catalog", f"the local catalog is damaged ({damage}): the files "
                                 f"it could not answer for were read again, and deltavault {what}", partial=False))
        if writer is not None:
            try:
                writer.commit(sid, start_ns, keep_blobs=archiver.page_blob_ids,
                              index_files=repo.live_index_files())
            except (sqlite3.Error, OSError) as exc:
                notes.append(Problem(str(writer.catalog.path), "catalog", "the snapshot is saved, but the "
                                     f"local catalog could not be updated ({exc}); the next run compares "
                                     "with older data and reads more", partial=False))
        if rejected:
            notes.append(Problem(str(cat_path), "catalog", rejected, partial=False))
        return BackupResult(sid, snap, st, archiver.problems + notes, previous.kind, previous.snapshot_id,
                            repo.write_stats.bytes_written, repo.traffic.bytes_read,
                            time.monotonic() - t0, snapshots)
    finally:
        if catalog is not None:
            catalog.close()


def scan_totals(sources: list[Source], opts: FileBackupOptions) -> tuple[int, int]:
    """(bytes, files) of the regular files a backup with ``opts`` would read at most: the
    same exclusions, skipped paths and file-system boundary as the archiver's walk."""
    excluded = Excludes(opts.excludes)
    total = count = 0
    for src in sources:
        try:
            root_dev = os.lstat(src.path).st_dev
        except OSError:
            continue
        stack = [src.path]
        while stack:
            p = stack.pop()
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if opts.one_file_system and st.st_dev != root_dev:
                    continue
                try:
                    with os.scandir(p) as it:
                        stack.extend(e.path for e in it
                                     if e.path not in opts.skip_paths and not excluded(e.path, e.name))
                except OSError:
                    pass
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
                count += 1
    return total, count


def _start_scanner(sources: list[Source], opts: FileBackupOptions, reporter: Reporter) -> None:
    """Sum sizes in the background so a terminal progress bar can show an ETA."""

    def scan() -> None:
        total, count = scan_totals(sources, opts)
        reporter.set_totals(total_bytes=total, total_items=count)

    threading.Thread(target=scan, name="dv-scan", daemon=True).start()
