"""Restoring a volume snapshot to an image file or a block device.

An image file is written beside the target under a temporary name, synced and renamed
over it, so a failed restore never leaves a half-written image under the target's name;
Hole blocks stay holes. Others may write in the target's directory: it is held open and
each step is made in it by fd (``TargetDir``), the temporary name is random and made
with ``O_EXCL | O_NOFOLLOW``, and a symlink under the target's name is followed only in a
directory nobody else may write in (``/dev/disk/by-id``): one another user planted, to a
block device, is refused, never written through. A block device is written in place (it must not be mounted and
must be at least as large as the volume); Hole blocks are zeroed with BLKZEROOUT.
``verify`` re-reads what was written and compares every page with the stored digests
(a file's holes unread: they are zeros).
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

from deltavault.chunking.pages import DIGEST, PageHasher
from deltavault.errors import NO_SPACE_ERRNOS, NoSpace, TargetError, UsageError
from deltavault.fs.clone import pwrite_all
from deltavault.fs.dirfd import reopen
from deltavault.fs.mounts import device_mounts
from deltavault.fs.paths import display
from deltavault.fs.sparse import ReadExtents
from deltavault.model.content import PAGE_SIZE, ContentRef, Hole, ref_blob_ids
from deltavault.model.volume import BlockMap, VolumeManifest
from deltavault.objects.reader import read_ref
from deltavault.objects.store import BlobReader
from deltavault.objects.volumes import load_segment_map
from deltavault.progress import NullReporter, Reporter
from deltavault.restore.voltarget import NEW_FILE, TargetDir

BLKZEROOUT = 0x127F  # _IO(0x12, 127)


@dataclass
class VolumeRestoreOptions:
    overwrite: bool = False
    verify: bool = False
    workers: int = 0
    page_key: bytes | None = None  # to verify against the page digests


@dataclass
class VolumeRestoreStats:
    target: str = ""
    target_kind: str = ""  # file | device
    target_format: str = "raw"  # raw | qcow2 | vhdx | vmdk (restore/imageformat.py)
    size: int = 0
    blocks: int = 0
    holes: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    pages_verified: int = 0
    pages_hashed: int = 0  # of those, read back and hashed (a file's holes are not)
    pages_mismatched: int = 0
    mismatches: list[int] = field(default_factory=list)  # first few page numbers
    seconds: float = 0.0


class _Blobs:
    def __init__(self, blobs: dict[bytes, bytes]) -> None:
        self.blobs = blobs

    def load_blob(self, blob_id: bytes) -> bytes:
        return self.blobs[blob_id]


def _mounted(dev: os.stat_result) -> str | None:
    try:
        found = device_mounts({f"{os.major(dev.st_rdev)}:{os.minor(dev.st_rdev)}"})
    except OSError:
        return None
    return found[0].mount_point if found else None


class VolumeRestorer:
    def __init__(self, repo: BlobReader, manifest: VolumeManifest, target: str,
                 options: VolumeRestoreOptions, reporter: Reporter | None = None) -> None:
        self.repo = repo
        self.m = manifest
        self.target = target
        self.opts = options
        self.reporter = reporter or NullReporter()
        self.stats = VolumeRestoreStats(target=target, size=manifest.size)

    def _open(self, where: TargetDir) -> tuple[int, bytes | None]:
        """(fd, temporary name to rename over the target, or None for a device)."""
        st, dev = where.examine()
        if dev is not None:
            return self._open_device(dev)
        if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise UsageError(f"{self.target} is neither a block device nor a regular file")
        if st is not None and not self.opts.overwrite:
            raise UsageError(f"{self.target} exists; pass --overwrite to replace it")
        tmp = b"." + where.name + b".dv-restore-" + os.urandom(6).hex().encode()
        fd = -1
        try:
            fd = os.open(tmp, NEW_FILE, 0o600, dir_fd=where.fd)
            os.ftruncate(fd, self.m.size)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
                where.unlink(tmp)
            if exc.errno in NO_SPACE_ERRNOS:
                raise NoSpace(f"no space to create {display(tmp)} beside {self.target}") from exc
            raise TargetError(f"cannot create {display(tmp)} beside {self.target}: {exc.strerror or exc}") from exc
        self.stats.target_kind = "file"
        return fd, tmp

    def _open_device(self, handle: int) -> tuple[int, bytes | None]:
        """The block device ``handle`` (an ``O_PATH`` handle) opened for writing: that
        device, whatever its name names by now."""
        try:
            st = os.fstat(handle)
            where = _mounted(st)
            if where:
                raise UsageError(f"{self.target} is mounted at {where}; unmount it first")
            if not self.opts.overwrite:
                raise UsageError(f"{self.target} is a block device: pass --overwrite to replace its content")
            fd = reopen(handle, os.O_WRONLY)
        finally:
            os.close(handle)
        size = os.lseek(fd, 0, os.SEEK_END)
        if size < self.m.size:
            os.close(fd)
            raise UsageError(f"{self.target} has {size} bytes; the volume needs {self.m.size}")
        self.stats.target_kind = "device"
        return fd, None

    def _segment_data(self, seg: int) -> tuple[BlockMap, dict[bytes, bytes]]:
        bm = load_segment_map(self.repo, self.m, seg)
        ids = [b for r in bm.refs for b in ref_blob_ids(r)]
        return bm, dict(self.repo.load_blobs(ids)) if ids else {}

    def run(self) -> VolumeRestoreStats:
        t0 = time.monotonic()
        with TargetDir(self.target) as where:
            self._run(where)
        self.reporter.finish()
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _run(self, where: TargetDir) -> None:
        fd, tmp = self._open(where)
        try:
            self.reporter.start("restore", total_bytes=self.m.size)
            workers = self.opts.workers or os.cpu_count() or 2
            with ThreadPoolExecutor(workers) as pool:
                # Fetch and decrypt ahead on the workers, at most workers + 1 segments (up
                # to 64 MiB of data each); write in order here. Executor.map would fetch
                # every segment at once and hold each until written: 2.8 GB for 4 GiB.
                segs = iter(range(len(self.m.segments)))
                ahead = deque(pool.submit(self._segment_data, s) for s in islice(segs, workers + 1))
                while ahead:
                    bm, blobs = ahead.popleft().result()
                    nxt = next(segs, None)
                    if nxt is not None:
                        ahead.append(pool.submit(self._segment_data, nxt))
                    self._write_segment(fd, bm, blobs)
                    del bm, blobs
            os.fsync(fd)
            if self.opts.verify:
                self.verify(fd)
            if tmp is not None:
                where.install(tmp, fd)
        except BaseException as exc:
            if tmp is not None:
                where.unlink(tmp)
            if isinstance(exc, OSError):
                if exc.errno in NO_SPACE_ERRNOS:
                    raise NoSpace(f"the restore target {self.target} is full "
                                  "(the partial image was removed)") from exc
                raise TargetError(f"writing {self.target}: {exc.strerror or exc}") from exc
            raise
        finally:
            os.close(fd)

    def _write_segment(self, fd: int, bm: BlockMap, blobs: dict[bytes, bytes]) -> None:
        src = _Blobs(blobs)
        off = bm.first * self.m.block_size
        for ref in bm.refs:
            self._write_block(fd, src, ref, off)
            off += ref.size
            self.reporter.advance(nbytes=ref.size)

    def _write_block(self, fd: int, src: _Blobs, ref: ContentRef, off: int) -> None:
        st = self.stats
        st.blocks += 1
        if isinstance(ref, Hole):
            st.holes += 1
            if st.target_kind == "device":
                try:
                    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", off, ref.size))
                except OSError:
                    pwrite_all(fd, bytes(ref.size), off)
                st.bytes_zeroed += ref.size
            return
        data = read_ref(src, ref)
        assert data is not None
        pwrite_all(fd, data, off)
        st.bytes_written += len(data)

    def verify(self, fd: int) -> None:
        """Read back the image open at ``fd`` and compare every page with the stored digests.
        A regular file's holes read as zeros by construction, so their pages are compared
        with the zero page's digest unread: a 1 TiB image holding 4 GiB reads 4 GiB. A device
        has no holes to ask for (and zeroed ranges are not trusted): all of it is read."""
        hasher = PageHasher(self.opts.page_key)
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            info = os.fstat(rfd)
            is_file = stat.S_ISREG(info.st_mode)
            if is_file and info.st_size < self.m.size:
                raise TargetError(f"{self.target} is shorter than the volume")
            extents = ReadExtents(rfd, self.m.size, is_file, PAGE_SIZE, min_hole=PAGE_SIZE)
            seg_bytes = self.m.segment_pages * PAGE_SIZE
            zeros = hasher.zero * self.m.segment_pages
            want_id, want = b"", b""
            for i, seg in enumerate(self.m.segments):
                if seg.digests != want_id:  # segments wholly holes share one digest blob
                    want_id, want = seg.digests, self.repo.load_blob(seg.digests)
                start = i * seg_bytes
                end = min(start + seg_bytes, self.m.size)
                pos = start
                for off, n in extents.ranges(start, end):
                    if off > pos:
                        self._compare(i, pos - start, zeros[:(off - pos) // PAGE_SIZE * DIGEST], want)
                    data = os.pread(rfd, n, off)
                    if len(data) != n:
                        raise TargetError(f"{self.target} is shorter than the volume")
                    got = hasher.digests(data.ljust(-(-n // PAGE_SIZE) * PAGE_SIZE, b"\0"))
                    self.stats.pages_hashed += len(got) // DIGEST
                    self._compare(i, off - start, got, want)
                    pos = off + n
                if pos < end:
                    self._compare(i, pos - start, zeros[:-(-(end - pos) // PAGE_SIZE) * DIGEST], want)
        finally:
            os.close(rfd)

    def _compare(self, seg: int, at: int, got: bytes, want: bytes) -> None:
        """Count the pages of segment ``seg`` from byte ``at`` whose digests ``got`` differ
        from ``want``; the first few mismatching page numbers are kept, in order."""
        st = self.stats
        first = at // PAGE_SIZE
        ref = want[first * DIGEST:first * DIGEST + len(got)]
        st.pages_verified += len(got) // DIGEST
        if got == ref:
            return
        for k in range(0, len(got), DIGEST):
            if got[k:k + DIGEST] != ref[k:k + DIGEST]:
                st.pages_mismatched += 1
                if len(st.mismatches) < 20:
                    st.mismatches.append(seg * self.m.segment_pages + first + k // DIGEST)
