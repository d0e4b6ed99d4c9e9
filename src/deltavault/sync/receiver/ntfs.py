"""The receiving side's part of NTFS metadata: set what SRC's ntfs-3g mount gave onto DST's
entry when DST is ntfs-3g too, or name what DST cannot keep; named streams written as the
file ``tmp:stream`` (checked to be the inode just written). (Onto other file systems streams
travel as ``user.`` xattrs, with the other xattrs.) ``AgentNtfs``: the same at the far end
of ssh, streams fetched from the sender (sync/wire.py, feature "ntfs")."""

from __future__ import annotations

import contextlib
import errno
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import blake3

from deltavault.errors import CorruptionError, SourceError
from deltavault.fs.clone import pwrite_all
from deltavault.fs.dirfd import expect_identity, fd_path, handle_at, identity
from deltavault.fs.ntfs import (
    WINDOWS,
    XATTR_STREAM,
    NtfsView,
    ReadResult,
    apply_meta,
    drop_cached,
    not_kept,
    read_meta,
    valid_stream_name,
)
from deltavault.fs.ntfsstage import NEW_STREAM, private
from deltavault.fs.paths import display
from deltavault.sync.receiver.dirstreams import put_dir_streams
from deltavault.sync.receiver.verify import read_back
from deltavault.sync.remote import DELTA_MAX, Changed, fetch_rebuilt, load_seed
from deltavault.sync.report import Outcomes
from deltavault.sync.wire import Frames, WinEntry


class NtfsDest:
    """``view``: DST's ntfs-3g view, None when DST is not on ntfs-3g."""

    def __init__(self, view: NtfsView | None) -> None:
        self.view = view

    @property
    def file_streams(self) -> bool:
        """Streams are written as files ``name:stream`` (any size)."""
        return self.view is not None and self.view.streams == WINDOWS

    def apply(self, target: int | bytes, meta: ReadResult) -> tuple[list[str], list[str]]:
        """Descriptor, reparse data, attributes and times onto ``target`` (after its POSIX
        metadata). Returns (problems, what DST cannot keep)."""
        if self.view is None:
            return [], not_kept(meta)
        return apply_meta(target, meta, last=False) + apply_meta(target, meta, last=True), []

    def same(self, src: ReadResult, dst: ReadResult) -> bool:
        """DST already has SRC's NTFS metadata (the change time, NTFS's own, aside)."""
        return (src.sd, src.attrib, src.times[:24], src.reparse) == (dst.sd, dst.attrib, dst.times[:24], dst.reparse)

    def open_stream(self, dfd: int, tmp: bytes, fd: int, stream: bytes) -> int:
        """The new stream ``stream`` of the file written as ``tmp`` in ``dfd`` (open as
        ``fd``), open for writing: ``dfd`` is a directory of our own (fs/ntfsstage.py)."""
        sfd = os.open(tmp + b":" + stream, NEW_STREAM, 0o600, dir_fd=dfd)
        if os.fstat(sfd).st_ino != os.fstat(fd).st_ino:
            os.close(sfd)
            raise OSError(errno.ESTALE, "the file was replaced while its streams were written")
        return sfd


class StreamsPhase:
    """The agent's side of a file's streams over ssh (sync/wire.py, feature "ntfs"): once
    the sender has sent a file's content and its entry lists streams, it answers requests
    until "bye", which ``close`` sends whatever happened before."""

    def __init__(self, chan: Frames, pending: bool) -> None:
        self.chan = chan
        self.pending = pending

    def close(self) -> None:
        if self.pending:
            self.pending = False
            self.chan.send({"op": "bye"})


def verify_stream(dfd: int, tmp: bytes, tfd: int, s: bytes, size: int, digest: bytes,
                  bufsize: int) -> tuple[int, str | None]:
    """--verify: the stream ``s`` written into the file staged as ``tmp`` (open as ``tfd``,
    the stream fsynced) read back past the page cache (receiver/verify.py). Returns (bytes
    read, the problem or None)."""
    h, _ = expect_identity(dfd, tmp + b":" + s, identity(os.fstat(tfd)))
    try:
        got, n, method = read_back(fd_path(h), bufsize)
    finally:
        os.close(h)
    if (n, got) != (size, digest):
        return n, f"stream {display(s)}: read back ({method}) {n} bytes that differ from what was written"
    return n, None


class StreamVerifyFailed(Exception):
    """A stream read back other bytes than were written (--verify): the file is not installed."""


@dataclass
class StreamsResult:
    written: int = 0
    verified: int = 0  # bytes read back (--verify)
    problems: list[str] = field(default_factory=list)  # streams not copied
    bad: list[str] = field(default_factory=list)  # streams that read back other bytes (--verify)


class SourceChangedStreams(Exception):
    """The sender says the file changed while its streams were read: discard it."""


class AgentNtfs:
    """The agent's part of NTFS metadata (feature "ntfs"): streams fetched into the file
    being written (whole, or by remote delta from DST's older version of the stream), the
    descriptor, attributes and times set after its POSIX metadata, and what DST cannot keep
    named for its log line."""

    def __init__(self, dest: NtfsDest, *, acl: bool, streams: bool, delta: bool, delta_min: int,
                 verify: bool, bufsize: int) -> None:
        self.dest, self.acl = dest, acl
        self.file_streams = streams and dest.file_streams
        self.xattr_streams = streams and not dest.file_streams
        self.delta, self.delta_min = delta, delta_min
        self.verify, self.bufsize = verify, bufsize
        # Directories' streams (with their parent's listing), until their end: as xattrs,
        # and what SRC's side could not send
        self._dir_xattrs: dict[bytes, dict[bytes, bytes]] = {}
        self._dir_lost: dict[bytes, list[str]] = {}

    # ------------------------------------------------------------------ deciding
    def streams_differ(self, dfd: int, name: bytes, win: WinEntry | None, dst: os.stat_result,
                       mtime_differs: bool) -> bool:
        """Must a file of the same size be sent again for its streams? Yes when they are
        not the same names and sizes as DST's, or when its mtime moved and it has streams
        (a stream write moves the file's mtime; ntfs-3g says no more: docs/windows.md)."""
        if not self.file_streams or win is None:
            return False
        mine = self._dest_streams(dfd, name, dst)
        if mtime_differs:
            return bool(win.streams or mine)
        return mine != win.streams

    def _dest_streams(self, dfd: int, name: bytes, dst: os.stat_result) -> dict[bytes, int]:
        assert self.dest.view is not None
        h, hst = handle_at(dfd, name)
        try:
            if identity(hst) != identity(dst):
                return {}
            names = read_meta(fd_path(h), self.dest.view).stream_names
        finally:
            os.close(h)
        out = {}
        for s in names:
            if valid_stream_name(s):
                out[s] = os.stat(name + b":" + s, dir_fd=dfd, follow_symlinks=False).st_size
        return out

    # ------------------------------------------------------------------ streams
    def receive_streams(self, phase: StreamsPhase, dfd: int, name: bytes, old: os.stat_result | None,
                        tmp: bytes, tfd: int, win: WinEntry, out: Outcomes) -> StreamsResult:
        """Each stream of ``win`` into the file staged as ``tmp`` (open as ``tfd``): fetched
        by remote delta when DST's older version of the file (``old``) has it big enough,
        else whole; with --verify read back. SourceChangedStreams when the sender says the
        file changed (it sends it again)."""
        res = StreamsResult()
        problems = res.problems
        streams = sorted(win.streams.items()) if self.file_streams else []
        for s, _ in streams:
            if not valid_stream_name(s):
                problems.append(f"stream {display(s)}: name not valid on DST; not copied")
        streams = [(s, size) for s, size in streams if valid_stream_name(s)]
        try:
            with private(dfd, tmp, tfd) if streams else nullcontext((dfd, tmp)) as (pfd, ptmp):
                for s, size in streams:
                    self._receive_stream(phase, pfd, ptmp, tfd, s, size, (dfd, name, old), res, out)
        except OSError as exc:  # (the private directory: the file is not installed without them)
            problems.append(f"streams: {exc.strerror or exc}; not copied")
        finally:
            phase.close()
        return res

    def _receive_stream(self, phase: StreamsPhase, pfd: int, tmp: bytes, tfd: int, s: bytes, size: int,
                        dest: tuple[int, bytes, os.stat_result | None], res: StreamsResult, out: Outcomes) -> None:
        """One stream into the file staged as ``tmp`` in the private directory ``pfd``;
        ``dest``: DST's directory, the file's name and DST's older version of it."""
        where = f"stream {display(s)}"
        try:
            ofd = self.dest.open_stream(pfd, tmp, tfd, s)
        except OSError as exc:
            res.problems.append(f"{where}: {exc.strerror or exc}; not copied")
            return
        try:
            seed = self._old_stream(*dest, s, size)
            if seed is not None:
                n, why, digest = self._delta(phase.chan, s, seed, ofd, size, out)
            else:
                n, why, digest = self._whole(phase.chan, s, ofd)
            if why is None and self.verify:
                os.fsync(ofd)
                res.verified += self._verify(pfd, tmp, tfd, s, n, digest, res)
        finally:
            os.close(ofd)
        res.written += n
        if why is not None:
            res.problems.append(f"{where}: {why}; not copied")
            with contextlib.suppress(OSError):  # (what was written of it: not a stream of SRC's)
                os.unlink(tmp + b":" + s, dir_fd=pfd)

    def _verify(self, dfd: int, tmp: bytes, tfd: int, s: bytes, size: int, digest: bytes,
                res: StreamsResult) -> int:
        n, problem = verify_stream(dfd, tmp, tfd, s, size, digest, self.bufsize)
        if problem is not None:
            res.bad.append(problem)
        return n

    def _old_stream(self, dfd: int, name: bytes, old: os.stat_result | None, s: bytes,
                    size: int) -> tuple[int, int] | None:
        """DST's older version of stream ``s``, open, and its size judged, when it is worth
        a remote delta."""
        if old is None or not self.delta or size < self.delta_min or size > DELTA_MAX:
            return None
        try:
            fd = os.open(name + b":" + s, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return None
        st = os.fstat(fd)
        if st.st_ino != old.st_ino or st.st_dev != old.st_dev or st.st_size < self.delta_min \
                or st.st_size > DELTA_MAX:
            os.close(fd)
            return None
        drop_cached(fd)  # (pages of a stream renamed over may be the old file's: fs/ntfs.py)
        return fd, st.st_size

    def _whole(self, chan: Frames, s: bytes, ofd: int) -> tuple[int, str | None, bytes]:
        chan.send({"op": "whole", "path": s})
        h = blake3.blake3(max_threads=1)
        off = 0
        error: str | None = None
        while True:
            frame = chan.recv()
            if not isinstance(frame, dict):
                raise CorruptionError("the sender sent a malformed stream frame")
            if "d" in frame:
                h.update(frame["d"])
                if error is None:
                    try:
                        pwrite_all(ofd, frame["d"], off)
                    except OSError as exc:
                        error = exc.strerror or str(exc)
                off += len(frame["d"])
            elif "end" in frame:
                if h.digest() != frame["end"]:
                    raise CorruptionError(f"stream {display(s)}: the data received does not match what was sent")
                return off, error, h.digest()
            elif frame.get("abort") == "changed":
                raise SourceChangedStreams
            else:
                return 0, f"the sender could not read it ({frame.get('abort')})", b""

    def _delta(self, chan: Frames, s: bytes, seed: tuple[int, int], ofd: int, size: int,
               out: Outcomes) -> tuple[int, str | None, bytes]:
        """The stream rebuilt from ``seed``, DST's older version (open, and its size
        judged: what is read of it, whatever its owner has extended it to since)."""
        seed_fd, seed_size = seed
        try:
            rebuilt = fetch_rebuilt(chan, s, partial(load_seed, seed_fd, seed_size), pages=seed_size == size)
        except Changed:
            raise SourceChangedStreams from None
        except (SourceError, CorruptionError) as exc:
            return 0, f"delta transfer failed: {exc.message}", b""
        finally:
            os.close(seed_fd)
        out.count(delta_wire_bytes=rebuilt.stats.data_fetched)
        off = 0
        for buf in rebuilt.buffers():
            pwrite_all(ofd, buf, off)
            off += len(buf)
        return off, None, rebuilt.stats.digest

    # ------------------------------------------------------------------ metadata
    def finish(self, target: int | bytes, win: WinEntry | None) -> tuple[list[str], list[str]]:
        """Descriptor, attributes and times after the entry's POSIX metadata (--acl).
        Returns (problems, what was not kept: SRC's side's, then DST's)."""
        if win is None:
            return [], []
        problems, lost = self.dest.apply(target, win.meta) if self.acl else ([], [])
        return problems, [*win.lost, *lost]

    def fix_kept(self, dfd: int, name: bytes, dst: os.stat_result, win: WinEntry | None) -> list[str]:
        """A file DST keeps: its descriptor, attributes and times set again if they differ
        (changing them moves only the ctime, which sync does not compare)."""
        if not self.acl or win is None or self.dest.view is None:
            return []
        dh, _ = expect_identity(dfd, name, identity(dst))
        try:
            if self.dest.same(win.meta, read_meta(fd_path(dh), self.dest.view, streams=False)):
                return []
            return self.dest.apply(fd_path(dh), win.meta)[0]
        finally:
            os.close(dh)

    def dir_streams(self, parent: int, name: bytes, fd: int, rel: bytes, win: WinEntry) -> list[str]:
        """A directory's own streams, from its entry in its parent's listing: onto ntfs-3g
        written now (before its times are set, at its end); else kept for its xattrs, and
        what SRC's side could not send for its log line. Returns the problems."""
        self._dir_lost[rel] = win.lost
        if self.file_streams:
            return put_dir_streams(parent, name, fd, win.inline or {})
        if self.xattr_streams:
            self._dir_xattrs[rel] = win.inline or {}
        return []

    def dir_xattrs(self, rel: bytes, xattrs: list[tuple[bytes, bytes]] | None) -> list[tuple[bytes, bytes]] | None:
        """A directory's xattrs, with its streams as ``user.`` xattrs onto a DST that keeps them so."""
        streams = self._dir_xattrs.pop(rel, None)
        if streams is None:
            return xattrs
        merged = dict(xattrs or [])
        merged.update((XATTR_STREAM + s, v) for s, v in streams.items())
        return sorted(merged.items())

    def finish_dir(self, fd: int, rel: bytes, win: WinEntry | None, out: Outcomes) -> None:
        """A directory's NTFS metadata, after its POSIX metadata; what DST could not keep
        goes in the log, counted."""
        problems, lost = self.finish(fd, win)
        lost[:0] = self._dir_lost.pop(rel, [])
        for m in problems:
            out.problem(rel, "metadata", m)
        if lost:
            out.count(ntfs_not_kept=1)
            out.note(rel, "NTFS not kept on DST: " + ", ".join(lost))
