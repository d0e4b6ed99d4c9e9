"""Writing one file's content references into an open file, and reading them back.

Memory is bounded whatever the file's size: references are loaded and written in batches
of about ``BATCH_BYTES``, or, for a large file given a pool, ``window`` segments of
``SEGMENT_BYTES`` at once. Holes are not written (the file is extended with ftruncate), so
sparse files stay sparse. ``--verify`` reads back through the same descriptor that wrote
the file, so it checks the inode this run made, whatever has been renamed meanwhile.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, wait

from deltavault.errors import CorruptionError
from deltavault.fs.clone import preallocate, pwrite_all
from deltavault.model.content import ContentRef, Full, Hole, Patch, content_size
from deltavault.model.nodes import Node
from deltavault.objects.patch import apply_patches
from deltavault.objects.reader import size_fault
from deltavault.objects.store import BlobReader

BATCH_BYTES = 64 * 1024 * 1024
SEGMENT_BYTES = 8 * 1024 * 1024  # a large file's unit of parallel work (write_content's pool)

# (offset, size, blob id of the bytes there, or None for a hole): what --verify checks
Expect = list[tuple[int, int, bytes | None]]


def check_sizes(node: Node) -> None:
    """A tree whose file size disagrees with the content it lists is damaged: restoring it
    would silently cut the file or pad it with zeros."""
    held = content_size(node.content)
    if held != node.size:
        raise CorruptionError(f"the tree records {node.size} bytes but its content holds {held}; "
                              "the file is not restored")


def write_content(repo: BlobReader, fd: int, node: Node, preloaded: dict[bytes, bytes], *,
                  digests: bool, pool: Executor | None = None, window: int = 4, fresh: bool = False) -> Expect:
    """Write every reference at its offset and give the file its size. ``digests``: blob ids
    of patched content are computed for --verify (plain blobs carry theirs).

    ``pool``: a large file's segments (``SEGMENT_BYTES`` of references each, at most
    ``window`` at once) are read, checked and written by its threads, in file order. One
    thread alone was the whole restore's critical path: the 821 MB database of the files
    benchmark took it ~2 s while the tree walk had long finished (a profile showed it
    waiting); decryption, decompression, hashing and writes release the GIL.

    ``fresh``: ``fd`` is a file just created, empty, so writing its data gives it its size
    unless the content ends in a hole (one ftruncate fewer per file, 10k in the benchmark)."""
    content = node.content
    if len(content) == 1 and isinstance(content[0], Full) and content[0].id in preloaded:
        # The common small file, one blob already loaded: no batching to do.
        ref = content[0]
        check_sizes(node)
        _put(fd, ref.id, preloaded[ref.id], 0, ref.size)
        if not fresh:
            os.ftruncate(fd, node.size)
        return [(0, ref.size, ref.id)]
    check_sizes(node)
    if pool is None or node.size < 2 * SEGMENT_BYTES:
        expect: Expect = []
        for batch in _batches(node.content, BATCH_BYTES):
            expect.extend(_write_batch(repo, fd, batch, preloaded, digests))
    else:
        # Each reference against its blob's length before the file is given any space: a
        # Full of 1 TiB naming a 5-byte blob was preallocated first, and a small target
        # ended "restore target is full" (exit 14) instead of naming the damage.
        for r in node.content:
            if (fault := size_fault(repo, r)) is not None:
                raise CorruptionError(fault)
        _preallocate(fd, node.content)
        expect = _write_parallel(repo, fd, node, preloaded, digests, pool, max(1, window))
    if not fresh or not _ends_in_data(node.content):
        os.ftruncate(fd, node.size)
    return expect


def _ends_in_data(content: list[ContentRef]) -> bool:
    """Whether the last bytes of the content are written (not a hole); true when empty."""
    for ref in reversed(content):
        if ref.size:
            return not isinstance(ref, Hole)
    return True


def _preallocate(fd: int, content: list[ContentRef]) -> None:
    """Allocate a large file's data ranges before its segments are written out of order:
    a full target fails here, and the file's blocks are not interleaved with other files'
    (measured on the files benchmark: a little less system and wall time). Holes stay
    unallocated, so sparse files stay sparse."""
    off = 0
    start = -1
    for ref in [*content, None]:
        if ref is None or isinstance(ref, Hole):
            if start >= 0 and off > start and not preallocate(fd, start, off - start):
                return  # the file system cannot: the writes allocate
            start = -1
        elif start < 0:
            start = off
        if ref is not None:
            off += ref.size


def _batches(content: list[ContentRef], limit: int) -> Iterator[list[tuple[int, ContentRef]]]:
    """The references with their offsets, cut into runs of about ``limit`` bytes of data."""
    off = 0
    batch: list[tuple[int, ContentRef]] = []
    batch_bytes = 0
    for ref in content:
        batch.append((off, ref))
        off += ref.size
        batch_bytes += 0 if isinstance(ref, Hole) else ref.size
        if batch_bytes >= limit:
            yield batch
            batch, batch_bytes = [], 0
    if batch:
        yield batch


def _write_parallel(repo: BlobReader, fd: int, node: Node, preloaded: dict[bytes, bytes], digests: bool,
                    pool: Executor, window: int) -> Expect:
    expect: Expect = []
    pending: deque[Future[Expect]] = deque()
    batches = list(_batches(node.content, SEGMENT_BYTES))
    held: dict[int, Callable[[], None]] = {}  # segment -> the release of its packs' hold

    def hold(j: int) -> None:
        # On S3 every segment thread waited for the same pack's GET, and no GET ran while
        # they worked on it (py-spy, issue #17): the pack a window ahead is asked for now,
        # so its GET overlaps this window's work. Held until the segment is written: the
        # small files' batches read other packs meanwhile, and a pack fetched ahead was
        # dropped before its segments came (issue #17). Not waiting: this thread holds
        # segments it has yet to submit, so another waiting on it would wait forever.
        held[j] = repo.hold_blobs([r.id for _o, r in batches[j] if isinstance(r, Full) and r.id not in preloaded])

    try:
        for j in range(min(window, len(batches))):
            hold(j)
        for i, batch in enumerate(batches):
            if len(pending) >= window:
                expect.extend(pending.popleft().result())
            if i + window < len(batches):
                hold(i + window)
            fut = pool.submit(_write_batch, repo, fd, batch, preloaded, digests)
            fut.add_done_callback(_releasing(held.pop(i)))
            pending.append(fut)
        while pending:
            expect.extend(pending.popleft().result())
    finally:
        # A segment still queued or running would write through ``fd`` after the caller has
        # closed it, when the number may already name another file: none may outlive us.
        for fut in pending:
            fut.cancel()
        wait(pending)
        for release in held.values():  # segments never submitted
            release()
    return expect


def _releasing(release: Callable[[], None]) -> Callable[[Future[Expect]], None]:
    """A future's done callback that calls ``release`` (a segment's hold, once written)."""
    return lambda _f: release()


def _write_batch(repo: BlobReader, fd: int, batch: list[tuple[int, ContentRef]],
                 preloaded: dict[bytes, bytes], digests: bool) -> Expect:
    """Write a batch of references. A blob not preloaded is written where it goes as soon as
    it is loaded and checked, while its bytes are still in the CPU's cache, rather than once
    the whole batch is loaded (a large file's segment: 8 MiB per thread held, then re-read
    from memory)."""
    expect: Expect = []
    at: dict[bytes, list[tuple[int, int]]] = {}  # blob id -> (offset, size) of each place it goes
    for off, ref in batch:
        if isinstance(ref, Hole):
            expect.append((off, ref.size, None))
            continue
        if isinstance(ref, Full):
            data = preloaded.get(ref.id)
            if data is None:
                at.setdefault(ref.id, []).append((off, ref.size))
            else:
                _put(fd, ref.id, data, off, ref.size)
            digest = ref.id  # load_blobs checked the bytes against it
        elif isinstance(ref, Patch):
            data = apply_patches(repo.load_blob(ref.base), [repo.load_blob(p) for p in ref.patches], ref.size)
            digest = repo.blob_id(data) if digests else b""
            pwrite_all(fd, data, off)
        else:
            raise CorruptionError(f"unknown content reference {ref!r}")
        expect.append((off, ref.size, digest))
    if at:
        for bid, data in repo.load_blobs(list(at)):
            for off, size in at[bid]:
                _put(fd, bid, data, off, size)
    return expect


def _put(fd: int, blob_id: bytes, data: bytes, off: int, size: int) -> None:
    """The blob ``blob_id``'s bytes at ``off``, where the tree says ``size`` bytes go."""
    if len(data) != size:
        raise CorruptionError(f"blob {blob_id.hex()[:16]} has {len(data)} bytes, tree says {size}")
    pwrite_all(fd, data, off)


def verify_fd(repo: BlobReader, fd: int, size: int, expect: Expect) -> tuple[int, list[str]]:
    """Re-read what was written through ``fd`` (opened for reading and writing), past the
    page cache, and check every range against its blob id; holes must read as zeros.
    Returns (bytes read, what differs)."""
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    bad: list[str] = []
    have = os.fstat(fd).st_size
    if have != size:
        bad.append(f"size {have}, expected {size}")
    read = 0
    for off, ln, digest in expect:
        if digest is None:
            if not _zeros(fd, off, ln):
                bad.append(f"hole at {off} holds data")
            continue
        data = os.pread(fd, ln, off)
        read += len(data)
        if len(data) != ln or repo.blob_id(data) != digest:
            bad.append(f"bytes {off}..{off + ln} differ")
    return read, bad


_ZEROS = bytes(1 << 20)


def _zeros(fd: int, off: int, ln: int) -> bool:
    """Whether [off, off+ln) reads as zeros; a range with no data extent needs no read."""
    try:
        nxt = os.lseek(fd, off, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        return True  # no data at or after off
    pos = max(off, nxt)
    end = off + ln
    while pos < end:
        data = os.pread(fd, min(len(_ZEROS), end - pos), pos)
        if not data:
            return True
        if data != _ZEROS[:len(data)]:
            return False
        pos += len(data)
    return True
