"""Per-page digests of large files, computed in a helper process.

Hashing 4 KiB pages one call at a time holds the GIL (about 2.5 us a page, half a second
for the 821 MB benchmark database), which stalls the threads that compress and encrypt.
A helper process does it beside them. It reads the file through the very descriptor the
main reader opened (passed over a unix socket, SCM_RIGHTS), never by path: no path length
limit applies and a file swapped in under the name meanwhile is not the one it reads. It
returns the digests only if the file's stat data is the same before and after its read
and equals what the main reader saw; otherwise the file gets no digests (the next run
stores it whole).

Why a separate read is safe: both readers hash the file's content over the same ranges
(``fs.sparse.ReadExtents``: offset, then bytes), and the main reader keeps the digests
only when the two hashes are equal, i.e. when both reads saw the same bytes. Stat data
alone could not prove that: a write within one timestamp tick leaves it unchanged.

Memory stays bounded whatever the file's size: the helper sends the digests one META
segment (64 MiB of file, 256 KiB of digests) at a time, a segment of holes as a one-byte
marker, and the main process stores each segment as it arrives, keeping only its id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import IO, Any

import blake3
import msgspec

from deltavault.chunking.pages import DigestSegments, PageHasher
from deltavault.framing import read_frame, write_frame
from deltavault.fs.sparse import ReadExtents

# Bytes the helper reads at a time: digests are per page, so any size gives the same ones;
# 1 MiB keeps the helper small (its whole memory counts towards the backup's).
WINDOW = 1024 * 1024
# Requests the helper may have queued: each holds an open file (in flight in the socket),
# and the kernel caps descriptors in flight per user.
MAX_PENDING = 16
Signature = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns
# Called with each META segment's bytes (None: a whole segment of holes); returns its id.
SegmentSink = Callable[[bytes | None], bytes]
Answer = tuple[list[bytes], bytes]  # segment ids, content hash


def signature(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_digests(fd: int, expect: Signature, sparse: bool, hasher: PageHasher,
                 emit: Callable[[bytes | None], None]) -> bytes | None:
    """Digest of every absolute 4 KiB page of the open file ``fd`` (holes digest as
    zeros), handed to ``emit`` segment by segment (``DigestSegments``). Returns the content
    hash of the ranges read (``ReadExtents``: offset, then bytes), or None if the file is
    not the one the caller read (then what was emitted must be dropped)."""
    try:
        if signature(os.fstat(fd)) != expect:
            return None
        size = expect[1]
        segments = DigestSegments(hasher, emit)
        content = blake3.blake3()
        pos = 0
        for start, ln in ReadExtents(fd, size, sparse).ranges():
            end = start + ln
            if start > pos:
                segments.add_zeros(start - pos)
            content.update(start.to_bytes(8, "little"))
            while start < end:
                n = min(WINDOW, end - start)
                data = os.pread(fd, n, start)
                if len(data) != n:
                    return None
                segments.add(hasher.digests(data))
                content.update(data)
                start += n
            pos = end
        if pos < size:
            segments.add_zeros(size - pos)
        segments.finish()
        if signature(os.fstat(fd)) != expect:
            return None
        return content.digest()
    except OSError:
        return None


# The helper is a plain child process (python -m deltavault.backup.files.pagedigests FD) rather
# than multiprocessing's spawn, which would re-import the caller's __main__ module and
# re-run an unguarded script that uses deltavault as a library.
# Requests travel on a SOCK_SEQPACKET socket (FD), one message each with the file's
# descriptor attached: first [key or None], then [id, signature, sparse]. Answers are
# framed msgpack (deltavault.framing) on the helper's stdout: [id, index, bytes or True]
# for each segment (True: all holes), then [id, -1, content hash], or [id, -1, None] when
# the file was not the one the caller read.
END = -1
MAX_REQUEST = 4096


def serve(sock: socket.socket, out: IO[bytes]) -> None:
    first, _fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, 1)
    if not first:
        return
    key = msgspec.msgpack.decode(first)[0]
    hasher = PageHasher(key)
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, 1)
        if not msg:
            for fd in fds:
                os.close(fd)
            return
        rid, sig, sparse = msgspec.msgpack.decode(msg)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            write_frame(out, [rid, END, None])
            continue
        index = 0

        def emit(data: bytes | None, rid: int = rid) -> None:
            nonlocal index
            write_frame(out, [rid, index, True if data is None else data])
            index += 1

        try:
            res = file_digests(fds[0], tuple(sig), bool(sparse), hasher, emit)
        finally:
            os.close(fds[0])
        write_frame(out, [rid, END, res])


@dataclass
class _Request:
    sink: SegmentSink
    fut: Future[Answer | None]
    ids: list[bytes] = field(default_factory=list)
    failed: bool = False


class PageDigester:
    """One helper process, started on first use; digests in this process if it cannot start."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self._hasher = PageHasher(key)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._waiting: dict[int, _Request] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_PENDING)
        self._next = 0
        self._broken = False

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "deltavault.backup.files.pagedigests", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, close_fds=True, pass_fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        ours.sendall(msgspec.msgpack.encode([self.key]))
        self._reader = threading.Thread(target=self._read_answers, name="dv-digest-reader", daemon=True)
        self._reader.start()

    def _read_answers(self) -> None:
        proc = self._proc  # close() may clear _proc meanwhile
        assert proc is not None
        try:
            self._read_loop(proc)
        except BaseException:
            # Answers that do not parse (something else wrote to the helper's stdout: a site
            # hook, a library): none after them can be trusted. Before, this thread died here
            # and every file waiting for digests waited forever (test_pagedigests.py).
            proc.kill()
        finally:
            with self._lock:  # the helper is gone: whoever still waits gets no digests
                self._broken = True
                waiting, self._waiting = self._waiting, {}
            for req in waiting.values():
                req.fut.set_result(None)
                self._slots.release()

    def _read_loop(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        while (got := read_frame(proc.stdout)) is not None:
            rid, index, value = got[0]
            with self._lock:
                req = self._waiting.get(rid)
            if req is None:
                continue
            if index != END:
                self._segment(req, index, value)
                continue
            with self._lock:
                self._waiting.pop(rid, None)
            ok = value is not None and not req.failed
            req.fut.set_result((req.ids, value) if ok else None)
            self._slots.release()

    @staticmethod
    def _segment(req: _Request, index: int, value: Any) -> None:
        if req.failed:
            return
        if index != len(req.ids) or not (value is True or isinstance(value, bytes)):
            req.failed = True  # out of order or malformed: no digests rather than wrong ones
            return
        try:
            req.ids.append(req.sink(None if value is True else value))
        except Exception:  # storing failed (the run reports the repository's error itself)
            req.failed = True

    def submit(self, fd: int, st: os.stat_result, sparse: bool,
               sink: SegmentSink) -> Future[Answer | None]:
        """Page digests of the open file ``fd`` (whose stat data ``st`` the caller read),
        each segment handed to ``sink`` as it is done, and the content hash over the
        ranges ``ReadExtents(fd, size, sparse)`` gives; the caller keeps the segments only
        if its own content hash is the same. ``fd`` stays the caller's to close."""
        fut: Future[Answer | None] = Future()
        self._slots.acquire()
        with self._lock:
            if not self._broken:
                rid: int | None = None
                try:
                    if self._proc is None:
                        self._start()
                    assert self._sock is not None
                    rid = self._next
                    self._next += 1
                    self._waiting[rid] = _Request(sink, fut)
                    msg = msgspec.msgpack.encode([rid, list(signature(st)), sparse])
                    socket.send_fds(self._sock, [msg], [fd])
                    return fut
                except (OSError, ValueError):
                    self._broken = True
                    if rid is not None:
                        self._waiting.pop(rid, None)
        self._slots.release()
        ids: list[bytes] = []
        res = file_digests(fd, signature(st), sparse, self._hasher, lambda d: ids.append(sink(d)))
        fut.set_result(None if res is None else (ids, res))
        return fut

    def close(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)
            self._sock.close()
            self._sock = None
        proc.wait(timeout=60)
        if self._reader is not None:
            self._reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        self._proc = None


if __name__ == "__main__":
    # The parent handles Ctrl-C (the terminal sends it to both) and ends this helper by
    # closing its socket; if the parent died instead, there is no one left to answer.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        serve(socket.socket(fileno=int(sys.argv[1])), sys.stdout.buffer)
    except (BrokenPipeError, ConnectionResetError):
        os._exit(0)
