"""Files the agent receives: streamed whole ("put": data frames, holes as lengths), or
rebuilt by remote delta from its older version and the chunks it lacks ("delta",
sync/remote.py). Either is written under a temp name, checked against the sender's
BLAKE3, and installed by the shared receiver (receiver/core.py)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from functools import partial

import blake3

from deltavault.chunking import rdc
from deltavault.errors import CorruptionError, SourceError
from deltavault.fs.clone import pwrite_all, reflink
from deltavault.fs.dirfd import Replaced, handle_at, lstat_at, reopen
from deltavault.fs.paths import display
from deltavault.sync.data import hash_zeros, is_zero
from deltavault.sync.receiver.core import Receiver, Staged
from deltavault.sync.receiver.ntfs import SourceChangedStreams, StreamsPhase
from deltavault.sync.receiver.temps import Where
from deltavault.sync.remote import DELTA_MAX, Changed, Rebuilt, fetch_rebuilt, load_seed
from deltavault.sync.wire import GROUP, Entry, Frames


def receive_whole(chan: Frames, rx: Receiver, dfd: int, where: Where, rel: bytes, e: Entry) -> None:
    """Take a file's frames off the wire (all of them, even when it cannot be written:
    ``dfd`` -1) and install it. An "abort" frame (the sender could not read it whole, and
    reports why) leaves DST as it was."""
    tmp: bytes | None = None
    tfd = -1
    error: OSError | None = None
    if dfd >= 0:
        try:
            tmp, tfd = rx.new_file(where, dfd, e.name)
        except OSError as exc:
            error = exc
    h = blake3.blake3(max_threads=1)
    off = written = 0
    phase = StreamsPhase(chan, False)
    try:
        while True:
            frame = chan.recv()
            if "d" in frame:
                data = frame["d"]
                h.update(data)
                if tfd >= 0 and error is None:
                    try:
                        pwrite_all(tfd, data, off)
                        written += len(data)
                    except OSError as exc:
                        error = exc
                off += len(data)
            elif "z" in frame:  # a hole: all zeros, not written
                hash_zeros(h, frame["z"])
                off += frame["z"]
            elif "end" in frame:
                break
            else:  # abort
                return
        phase.pending = _has_streams(e)  # the sender now serves the file's streams, if it has any
        if error is None and tmp is not None:
            if off != e.st.st_size or h.digest() != frame["end"]:
                raise CorruptionError(f"{display(rel)}: the data received does not match what was sent")
            if written < off:
                os.ftruncate(tfd, off)
            old = lstat_at(dfd, e.name)
            if _install(phase, rx, dfd, tfd, where, tmp, rel, e, "new" if old is None else "update", written,
                        frame["end"], old=old):
                tmp = None
    except OSError as exc:
        error = exc
    finally:
        phase.close()
        if tfd >= 0:
            os.close(tfd)
        if tmp is not None:
            rx.discard(where, dfd, tmp)
    if error is not None:
        rx.out.os_problem(rel, error)


def _has_streams(e: Entry) -> bool:
    """Does the sender serve this file's NTFS streams after its content (sync/wire.py)?"""
    return e.win is not None and bool(e.win.streams)


def _install(phase: StreamsPhase, rx: Receiver, dfd: int, tfd: int, where: Where, tmp: bytes, rel: bytes,
             e: Entry, action: str, written: int, digest: bytes, *, old: os.stat_result | None,
             reflinked: bool = False) -> bool:
    """The file's NTFS streams (before its times are set: writing a stream changes them),
    its metadata, then the rename. False: the sender said the file changed meanwhile (the
    caller discards it: the sender sends it again, or a stream read back other bytes)."""
    note = None
    ntfs = rx.ntfs
    if ntfs is not None and e.win is not None:
        try:
            got = ntfs.receive_streams(phase, dfd, e.name, old, tmp, tfd, e.win, rx.out)
        except SourceChangedStreams:
            return False
        written += got.written
        rx.meta_problems(rel, got.problems)
        if got.verified:
            rx.out.count(bytes_verified=got.verified)
        if got.bad:  # DST keeps its previous version
            rx.out.problem(rel, "verify", "; ".join(got.bad), size=e.st.st_size)
            return False
    phase.close()
    ident = rx.finish_file(tfd, rel, e.st, e.xattrs)
    if ntfs is not None:
        problems, lost = ntfs.finish(tfd, e.win)
        rx.meta_problems(rel, problems)
        note = "NTFS not kept on DST: " + ", ".join(lost) if lost else None
    rx.install(dfd, where, e.name, rel, e.st, Staged(tmp, action, written, ident, digest, reflinked, note),
               group=e.extra == GROUP)
    return True


def receive_delta(chan: Frames, rx: Receiver, dfd: int, where: Where, rel: bytes, e: Entry) -> None:
    """Rebuild the file from our old version and the chunks it lacks, fetched from the
    sender (which serves them until we say "bye"), then install it."""
    seed_fd = -1
    # Unless the file changed while the sender read it, the sender then serves its streams.
    phase = StreamsPhase(chan, False)
    try:
        rebuilt = None
        try:
            phase.pending = _has_streams(e)
            if dfd >= 0:
                seed_fd, seed_size = _open_seed(dfd, e.name)
                rebuilt = _fetch(chan, rx, (seed_fd, seed_size), rel, e)
        except Changed:
            phase.pending = False  # the sender sends it again, or reports it
        except OSError as exc:
            rx.out.os_problem(rel, exc)
        finally:
            chan.send({"op": "bye"})  # ends the sender's answering loop, whatever happened
        if rebuilt is not None:
            _write_rebuilt(phase, rx, dfd, where, seed_fd, rel, e, rebuilt)
    finally:
        phase.close()
        if seed_fd >= 0:
            os.close(seed_fd)


def _open_seed(dfd: int, name: bytes) -> tuple[int, int]:
    """The old version of a file, for a delta: opened through a handle checked to be a
    regular file (a FIFO or device swapped in is never opened), and how much of it is read:
    its size when the handle was taken, at most DELTA_MAX."""
    h, st = handle_at(dfd, name)
    try:
        if not stat.S_ISREG(st.st_mode):
            raise Replaced("not a regular file")
        return reopen(h, os.O_RDONLY), min(st.st_size, DELTA_MAX)
    finally:
        os.close(h)


def _fetch(chan: Frames, rx: Receiver, seed: tuple[int, int], rel: bytes, e: Entry) -> Rebuilt | None:
    """The rebuilt file, or None when it cannot be (reported); Changed when the sender says
    the file changed while read. ``seed``: the old version, open, and how much of it to read
    (whatever its owner has extended it to since: read to EOF, a file truncated to some
    GiB meanwhile, sparse and free, was loaded whole)."""
    # Same size: most likely changed in place (a database, a VM image), so compare whole
    # pages, and a change costs exactly its pages; else content-defined chunks.
    pages = seed[1] == e.st.st_size
    try:
        rebuilt = fetch_rebuilt(chan, rel, partial(load_seed, *seed), pages=pages)
    except Changed:
        raise
    except (SourceError, CorruptionError) as exc:
        rx.out.problem(rel, "write", f"delta transfer failed: {exc.message}", size=e.st.st_size)
        return None
    rx.out.count(delta_wire_bytes=rebuilt.stats.data_fetched)
    return rebuilt


def _write_rebuilt(phase: StreamsPhase, rx: Receiver, dfd: int, where: Where, seed_fd: int, rel: bytes, e: Entry,
                   rebuilt: Rebuilt) -> None:
    """Into a reflink clone of the old file, writing only the fetched chunks, when every
    reused chunk sits where it sat before; else the whole file. Zeros stay holes."""
    tmp: bytes | None = None
    tfd = -1
    try:
        tmp, tfd = rx.new_file(where, dfd, e.name)
        size = rebuilt.plan.size
        # (Pieces of zeros may come from anywhere in the seed: all have one digest.)
        in_place = all(s is None or s == o or d == rdc.zero_digest(n) for o, n, d, s in rebuilt.plan.pieces)
        reflinked = in_place and reflink(seed_fd, tfd)
        if reflinked:
            written = _write_changed(tfd, rebuilt)
        else:
            written = _write_regions(tfd, rebuilt.regions())
        if os.fstat(tfd).st_size != size:  # (XFS flushes a truncated file on close)
            os.ftruncate(tfd, size)
        if _install(phase, rx, dfd, tfd, where, tmp, rel, e, "delta", written, rebuilt.stats.digest,
                    old=os.fstat(seed_fd), reflinked=reflinked):
            tmp = None
    except OSError as exc:
        rx.out.os_problem(rel, exc)
    finally:
        if tfd >= 0:
            os.close(tfd)
        if tmp is not None:
            rx.discard(where, dfd, tmp)


def _write_changed(fd: int, rebuilt: Rebuilt) -> int:
    """Into a clone of the seed: only what is not already there. Returns the bytes written."""
    old = rebuilt.seed.stream
    written = 0
    for off, n, buf, from_seed in rebuilt.regions():
        if buf is None and is_zero(old[off:off + n]):
            continue  # zeros over zeros
        if buf is None or not from_seed:
            pwrite_all(fd, buf if buf is not None else bytes(n), off)
            written += n
    return written


def _write_regions(fd: int, regions: Iterator[tuple[int, int, bytes | memoryview | None, bool]]) -> int:
    """Write each region at its offset, many per system call; pieces of zeros are skipped
    (holes: the caller sets the size). Returns the bytes written."""
    written = start = end = 0
    batch: list[bytes | memoryview] = []
    for off, n, buf, _from_seed in regions:
        if buf is None:
            continue
        if batch and (off != end or len(batch) >= 512):
            _pwritev_all(fd, batch, start, end - start)
            batch = []
        if not batch:
            start = off
        batch.append(buf)
        end = off + n
        written += n
    if batch:
        _pwritev_all(fd, batch, start, end - start)
    return written


def _pwritev_all(fd: int, batch: list[bytes | memoryview], off: int, want: int) -> None:
    n = os.pwritev(fd, batch, off)
    if n < want:  # a short write (a signal, a nearly full disk): finish it
        pwrite_all(fd, b"".join(batch)[n:], off + n)

