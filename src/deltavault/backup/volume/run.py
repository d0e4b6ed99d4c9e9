"""One volume backup run: open the volume, ask the change sources what changed, store the
changed pages of each segment, save the manifest and the snapshot, then move checkpoints.

Order matters for safety: blobs, then the index (``flush``), then the snapshot; only then
does the access drop the previous checkpoint (bitmap, btrfs snapshot). A failure before
that leaves the previous checkpoint in place and removes this run's.
"""

from __future__ import annotations

import os
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pyroaring import BitMap

from deltavault.backup.volume.blocks import SegmentEncoder, SegmentPlan, SegmentResult
from deltavault.backup.volume.opening import open_access
from deltavault.backup.volume.options import (
    VolumeReport,
    VolumeRequest,
    VolumeResult,
    block_sets,
    default_source_id,
    snapshot_summary,
    validate,
)
from deltavault.backup.volume.state import LocalState, MetaStore, PrevVolume, find_previous
from deltavault.chunking.pages import DIGEST, PageHasher
from deltavault.errors import DeltavaultError, SourceError, UsageError
from deltavault.model.content import PAGE_SIZE
from deltavault.model.volume import (
    SEGMENT_PAGES,
    BlockMap,
    Checkpoint,
    Segment,
    VolumeManifest,
    encode,
)
from deltavault.progress import NullReporter, Reporter
from deltavault.repository.hosttag import HostTagger
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import new_snapshot
from deltavault.repository.status import failures_recorded
from deltavault.tracking.volume import pagesets
from deltavault.tracking.volume.access import VolumeAccess, mounted_rw
from deltavault.tracking.volume.base import (
    BlockDigestSource,
    Changes,
    ChangeSource,
    FsScanner,
    Rejected,
)
from deltavault.tracking.volume.fsdetect import detect
from deltavault.tracking.volume.fsdigests import FsDigestSource
from deltavault.tracking.volume.partitions import layout
from deltavault.workers import Inflight


class VolumeBackup:
    def __init__(self, repo: Repository, req: VolumeRequest, reporter: Reporter) -> None:
        self.repo = repo
        self.req = req
        self.opts = req.options
        self.reporter = reporter
        self.report = VolumeReport(source=req.path, block_size=self.opts.block_size,
                                   free_space=self.opts.free_space)
        self.logical = req.logical or os.path.abspath(req.path)
        self.source_id = req.source_id or default_source_id(req.hostname, self.logical)
        self.state = LocalState.load(repo.cache_dir, self.source_id, key=repo.cache_key("volume state"))
        if self.state.note:  # a state file we did not write: what it names is left alone
            self.report.warnings.append(self.state.note)
        self.meta = MetaStore(repo, self.state.dir / "meta" if self.state.dir else None)
        self.hasher = PageHasher(repo.master.mac if repo.master else None)
        self.new_id = secrets.token_hex(8)
        self.native: ChangeSource | None = None
        self._written0 = self._blobs0 = self._downloaded0 = self._raw0 = 0
        self._read_blocks, self._changed_blocks = BitMap(), BitMap()  # for reports (BlockSets)

    # ------------------------------------------------------------------ selection
    def _sources(self, access: VolumeAccess, fs_source: FsDigestSource) -> list[ChangeSource]:
        cbt = self.opts.cbt
        out: list[ChangeSource] = []
        native = access.native()
        self.native = native
        if native is not None and cbt in ("auto", "qemu", "btrfs"):
            out.append(native)
        if cbt != "digests":
            out.append(fs_source)
        out.append(BlockDigestSource())
        return out

    def _choose(self, sources: list[ChangeSource], prev: PrevVolume | None) -> Changes:
        manifest = prev.manifest if prev else None
        for src in sources:
            try:
                ch = src.changes(manifest)
            except Rejected as exc:
                self.report.rejected.append({"source": src.name, "reason": str(exc)})
                continue
            except DeltavaultError as exc:
                if isinstance(exc, SourceError) and src.name == "block-digests":
                    raise
                self.report.rejected.append({"source": src.name, "reason": f"failed: {exc.message}"})
                continue
            self.report.change_source = ch.source
            self.report.bytes_dirty = ch.dirty_bytes
            self.report.notes += ch.notes
            return ch
        raise AssertionError("block digests never refuse")

    # ------------------------------------------------------------------ the run
    def run(self) -> VolumeResult:
        """The run; one that fails is recorded in the repository's status records."""
        with failures_recorded(self.repo, snapshot_kind="volume", source_id=self.source_id,
                               paths=[self.logical], hostname=self.req.hostname):
            return self._run()

    def _run(self) -> VolumeResult:
        validate(self.opts)
        if not os.path.exists(self.req.path):
            raise UsageError(f"volume {self.req.path!r} does not exist")
        t0 = time.monotonic()
        start_ns = time.time_ns()
        # The repository's counters may already hold earlier runs (one process, many runs).
        self._written0 = self.repo.write_stats.bytes_written
        self._blobs0 = self.repo.write_stats.blobs_added
        self._downloaded0 = self.repo.traffic.bytes_read
        self._raw0 = self.repo.write_stats.bytes_added_raw
        packs = self.repo.check_packs()  # one listing: orphans adopted, missing packs' blobs absent
        tagger = HostTagger.for_repository(self.repo)
        if tagger.note:
            self.report.warnings.append(tagger.note)
        prev, why, passed = find_previous(self.repo, self.meta, self.source_id, self.req.parent, tagger)
        if why:
            self.report.notes.append(why)
        if passed:
            self.report.rejected.append({"source": "parent", "reason": passed})
        if packs.warning():
            self.report.warnings.append(packs.warning())
            self.report.packs_missing, self.report.packs_truncated = len(packs.missing), len(packs.truncated)
            self.report.index_entries_dropped = packs.dropped
            if prev is not None and packs.dropped:
                # Unchanged segments and blocks are reused from the manifest without a lookup,
                # and some of their blobs are gone: everything is read; what is still stored
                # is deduplicated, the rest stored again.
                self.report.notes.append("blobs were dropped for missing packs: the previous snapshot is not "
                                         "used, the volume is read whole")
                prev = None
        access = open_access(self.req.path, self.opts, self.state)
        prev_native: Checkpoint | None = None
        if prev is not None:
            prev_native = next((c for c in prev.manifest.checkpoints if c.source in ("qemu-bitmap", "btrfs")),
                               None)
        where = mounted_rw(self.req.path)
        if where:
            self.report.warnings.append(f"{self.req.path} is mounted read-write at {where}: the copy is "
                                        "consistent only if that file system is frozen (fsfreeze)")
        try:
            reader = access.open(prev_native, self.new_id)
            self.report.size = reader.size
            self.report.source = reader.description
            self.report.source_format = access.source_format
            result = self._backup(access, reader, prev, t0, start_ns, tagger)
        except BaseException:
            access.abort()
            raise
        self.report.warnings += access.commit()
        if prev_native is not None and prev_native.source == "btrfs" and access.kind != "btrfs":
            from deltavault.tracking.volume.btrfs import retire

            self.report.warnings += retire(prev_native, self.req.path, self.state)
        self.state.save()
        return result

    def _backup(self, access: VolumeAccess, reader: Any, prev: PrevVolume | None, t0: float,
                start_ns: int, tagger: HostTagger) -> VolumeResult:
        opts, rep = self.opts, self.report
        size = reader.size
        if size == 0:
            raise SourceError(f"{self.req.path} is empty")
        if prev is not None:
            pm = prev.manifest
            if pm.size != size:
                rep.notes.append(f"the volume was resized ({pm.size} -> {size} bytes): reading everything")
                prev = None
            elif pm.block_size != opts.block_size or pm.segment_pages != SEGMENT_PAGES:
                rep.notes.append(f"the block size changed ({pm.block_size} -> {opts.block_size}): "
                                 "reading everything")
                prev = None
        n_pages = pagesets.pages_of(size)
        if n_pages > pagesets.MAX_PAGES:
            # Page sets are 32-bit roaring bitmaps; docs/design.md (Limits) says why it stays.
            raise SourceError(f"{self.req.path} has {size} bytes, more than the 16 TiB (2^32 pages of 4 KiB) "
                              "a volume may have")
        everything = pagesets.span(0, n_pages)
        scanner, why_no_fs = detect(reader)
        holes = reader.zero_pages() & everything
        free = BitMap()
        if scanner is not None:
            rep.file_system = scanner.kind
            if scanner.distrust:
                rep.notes.append(f"{scanner.kind}: {scanner.distrust}; free space is read too")
            elif opts.free_space == "skip":
                free = self._free_pages(scanner, everything)
        elif why_no_fs:
            rep.notes.append(why_no_fs)
        zero = holes | free
        uncaptured = free - holes
        fs_source = FsDigestSource(scanner, why_no_fs, self.meta)
        changes = self._choose(self._sources(access, fs_source), prev)
        to_read = self._read_set(changes, prev, everything, zero)
        if prev is not None and opts.verify_cbt and changes.pages is not None:
            to_read = self._verify(reader, prev, everything - to_read - zero, to_read, zero, everything)
        rep.bytes_to_read = len(to_read) * PAGE_SIZE
        rep.bytes_free_skipped = len(uncaptured) * PAGE_SIZE
        rep.bytes_zero_skipped = len(holes) * PAGE_SIZE
        segments = self._encode(reader, prev, to_read, zero, n_pages, size)
        checkpoints = [c for c in (self._native_checkpoint(), self._fs_checkpoint(fs_source, changes))
                       if c is not None]
        manifest = VolumeManifest(size=size, block_size=opts.block_size, segments=segments,
                                  zero=pagesets.dump(zero), free=pagesets.dump(uncaptured),
                                  free_space=opts.free_space,
                                  fs=scanner.info if scanner is not None and not scanner.distrust else None,
                                  checkpoints=checkpoints, source_format=rep.source_format)
        manifest_id = self.meta.put(encode(manifest))
        self.reporter.start("upload")  # the last packs and the index; the read bar is gone
        try:
            self.repo.flush()
        finally:
            self.reporter.finish()
        rep.bytes_read = reader.bytes_read
        rep.bytes_added = self.repo.write_stats.bytes_written - self._written0
        rep.bytes_downloaded = self.repo.traffic.bytes_read - self._downloaded0
        rep.blocks_total = -(-size // opts.block_size)
        rep.bytes_changed = rep.pages_changed * PAGE_SIZE
        rep.parent = prev.snapshot_id if prev else None
        rep.seconds = round(time.monotonic() - t0, 3)
        summary = snapshot_summary(rep, blobs_added=self.repo.write_stats.blobs_added - self._blobs0,
                                   raw_added=self.repo.write_stats.bytes_added_raw - self._raw0,
                                   blocks_read=len(self._read_blocks),
                                   blocks=block_sets(size, opts.block_size, self._read_blocks,
                                                     self._changed_blocks, layout(size, scanner)))
        snap = tagger.sign(new_snapshot(start_ns=start_ns, hostname=self.req.hostname, kind="volume",
                                        paths=[self.logical], source_id=self.source_id, volume=manifest_id,
                                        parent=rep.parent, tags=self.req.tags, summary=summary))
        sid = self.repo.save_snapshot(snap)
        keep = {manifest_id, *(s.map for s in segments), *(s.digests for s in segments),
                *(b for c in checkpoints for b in c.state)}
        self.meta.keep_only(keep)
        return VolumeResult(sid, snap, rep)

    def _native_checkpoint(self) -> Checkpoint | None:
        return self.native.checkpoint() if self.native is not None else None

    def _fs_checkpoint(self, fs_source: FsDigestSource, changes: Changes) -> Checkpoint | None:
        """Metadata digests are kept when they are the source, or may be next time. Runs
        with a native source skip them: computing them reads every inode table."""
        keep = changes.source == fs_source.name or (
            self.opts.cbt in ("auto", "fs") and self.native is None)
        if not keep:
            return None
        try:
            return fs_source.checkpoint()
        except DeltavaultError:
            raise
        except Exception as exc:  # damaged metadata: no digests this time
            self.report.notes.append(f"no metadata digests kept: {exc}")
            return None

    # ------------------------------------------------------------------ planning
    def _free_pages(self, scanner: FsScanner, everything: BitMap) -> BitMap:
        try:
            alloc = scanner.allocation()
        except DeltavaultError:
            raise
        except Exception as exc:  # damaged on-disk bitmaps: read everything
            scanner.distrust = f"its allocation bitmaps could not be read: {exc}"
            self.report.notes.append(f"{scanner.kind}: {scanner.distrust}; free space is read too")
            return BitMap()
        return (pagesets.span(0, alloc.fs_pages) - alloc.allocated) & everything

    @staticmethod
    def _read_set(changes: Changes, prev: PrevVolume | None, everything: BitMap, zero: BitMap) -> BitMap:
        if changes.pages is None or prev is None:
            return everything - zero
        # Pages restored as zeros last time (holes, free space) that are neither now must be
        # read whatever the source says: the file system may have allocated them.
        return ((changes.pages & everything) | (prev.zero - zero)) - zero

    def _verify(self, reader: Any, prev: PrevVolume, unchanged: BitMap, to_read: BitMap, zero: BitMap,
                everything: BitMap) -> BitMap:
        """Read a sample of blocks the source called unchanged; compare with the stored digests."""
        ppb = self.opts.block_size // PAGE_SIZE
        blocks = sorted({p // ppb for p in unchanged})
        sample = random.SystemRandom().sample(blocks, min(self.opts.verify_cbt, len(blocks)))
        checked = mismatched = 0
        for b in sorted(sample):
            pages = pagesets.clamp(unchanged, b * ppb, (b + 1) * ppb)
            seg = b * ppb // SEGMENT_PAGES
            digests = self.meta.get(prev.manifest.segments[seg].digests)
            for s, e in pagesets.runs(pages):
                buf = bytearray((e - s) * PAGE_SIZE)
                n = min(len(buf), self.report.size - s * PAGE_SIZE)
                reader.read_into(memoryview(buf)[:n], s * PAGE_SIZE)
                got = self.hasher.digests(buf)
                base = (s - seg * SEGMENT_PAGES) * DIGEST
                want = digests[base:base + len(got)]
                checked += e - s
                mismatched += sum(1 for i in range(0, len(got), DIGEST) if got[i:i + DIGEST] != want[i:i + DIGEST])
        self.report.verify_cbt = {"blocks_sampled": len(sample), "pages_checked": checked,
                                  "pages_mismatched": mismatched}
        if not mismatched:
            return to_read
        self.report.rejected.append({"source": self.report.change_source,
                                     "reason": f"--verify-cbt: {mismatched} of {checked} sampled pages it "
                                               "called unchanged have changed"})
        self.report.change_source = "block-digests"
        return everything - zero

    # ------------------------------------------------------------------ encoding
    def _encode(self, reader: Any, prev: PrevVolume | None, to_read: BitMap, zero: BitMap,
                n_pages: int, size: int) -> list[Segment]:
        opts, rep = self.opts, self.report
        workers = opts.workers or os.cpu_count() or 2
        n_segments = -(-n_pages // SEGMENT_PAGES)
        rep.segments_total = n_segments
        segments: list[Segment | None] = [None] * n_segments
        pending: list[SegmentResult] = []
        self.reporter.start("volume", total_bytes=len(to_read) * PAGE_SIZE)
        with ThreadPoolExecutor(workers, thread_name_prefix="dv-volume") as pool:
            enc = SegmentEncoder(self.repo, reader, self.hasher, size=size, block_size=opts.block_size,
                                 pool=pool, inflight=Inflight(opts.buffer_memory),
                                 buffer_memory=opts.buffer_memory)
            for s in range(n_segments):
                first = s * SEGMENT_PAGES
                n = min(SEGMENT_PAGES, n_pages - first)
                seg_read = pagesets.clamp(to_read, first, first + n)
                seg_zero = pagesets.clamp(zero, first, first + n)
                prev_seg = prev.manifest.segments[s] if prev is not None else None
                if (prev is not None and prev_seg is not None and not seg_read
                        and seg_zero == pagesets.clamp(prev.zero, first, first + n)):
                    segments[s] = prev_seg
                    continue
                plan = SegmentPlan(s, first, n, seg_read, seg_zero)
                if prev_seg is not None:
                    self._load_prev(plan, prev_seg)
                pending.append(enc.encode(plan))
                rep.segments_written += 1
                self.reporter.advance(nbytes=len(plan.read) * PAGE_SIZE)
                # Segments whose blocks are still being stored (the encoder bounds their buffers).
                while len(pending) > 2:
                    r = pending.pop(0)
                    segments[r.plan.index] = self._finish(r)
            for r in pending:
                segments[r.plan.index] = self._finish(r)
        self.reporter.finish()
        return [seg for seg in segments if seg is not None]

    def _load_prev(self, plan: SegmentPlan, prev_seg: Segment) -> None:
        blocks = -(-plan.n_pages * PAGE_SIZE // self.opts.block_size)
        try:
            bm = self.meta.block_map(prev_seg.map)
            digests = self.meta.get(prev_seg.digests)
            if len(bm.refs) != blocks or len(digests) != plan.n_pages * DIGEST:
                raise SourceError("sizes do not match the volume")
        except DeltavaultError as exc:
            # Without the previous map and digests this segment is read whole.
            self.report.notes.append(f"segment {plan.index}: previous block map or digests unusable "
                                     f"({exc.message}); read whole")
            everything = pagesets.span(plan.first_page, plan.first_page + plan.n_pages)
            plan.read = everything - plan.zero
            return
        plan.prev_refs = bm.refs
        plan.prev_digests = digests

    def _finish(self, r: SegmentResult) -> Segment:
        refs = r.resolved()
        first_block = r.plan.first_page * PAGE_SIZE // self.opts.block_size
        map_id = self.meta.put(encode(BlockMap(first=first_block, refs=refs)))
        dig_id = self.meta.put(r.digests)
        st = r.stats
        rep = self.report
        rep.blocks_changed += st.blocks_changed
        rep.pages_changed += st.pages_changed
        rep.bytes_extra_read += st.extra_read
        self._read_blocks.update(st.read_blocks)
        self._changed_blocks.update(st.changed_blocks)
        if st.stale_mismatch:
            rep.warnings.append(f"segment {r.plan.index}: {st.stale_mismatch} pages the change source "
                                "called unchanged had changed (stored correctly)")
        return Segment(map_id, dig_id)


def run_volume_backup(repo: Repository, req: VolumeRequest, reporter: Reporter | None = None) -> VolumeResult:
    return VolumeBackup(repo, req, reporter or NullReporter()).run()
