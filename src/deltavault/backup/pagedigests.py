"""Per-page digests of large files, computed in a helper process.

Hashing 4 KiB pages one call at a time holds the GIL (about 2.5 us a page, half a second
for the 821 MB benchmark database), which stalls the threads that compress and encrypt.
A helper process does it beside them. It reads the file itself and returns the digests
only if the file's stat data is the same before and after its read and equals what the
main reader saw; otherwise the file gets no digests (the next run stores it whole).

Why a separate read is safe: both readers hash the file's content over the same extents
(offset, then bytes), and the main reader keeps the digests only when the two hashes are
equal, i.e. when both reads saw the same bytes. Stat data alone could not prove that: a
write within one timestamp tick leaves it unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import IO, Any

import blake3

from deltavault.chunking.pages import PageHasher
from deltavault.framing import read_frame, write_frame

WINDOW = 8 * 1024 * 1024
Signature = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns

_hasher: PageHasher | None = None


def _init(key: bytes | None) -> None:
    global _hasher
    _hasher = PageHasher(key)


def _sig(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_digests(path: bytes, expect: Signature,
                 extents: list[tuple[int, int]]) -> tuple[bytes, bytes] | None:
    """Digest of every absolute 4 KiB page (holes digest as zeros), and the content hash of
    ``extents`` (see ``content_hash_update``). None if the file is not the one the caller read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        if _sig(os.fstat(fd)) != expect:
            return None
        size = expect[1]
        hasher = _hasher or PageHasher(None)
        content = blake3.blake3()
        out = bytearray()
        pos = 0
        for start, ln in extents:
            end = start + ln
            if start > pos:
                out += hasher.zero_run(start - pos)
            content.update(start.to_bytes(8, "little"))
            while start < end:
                n = min(WINDOW, end - start)
                data = os.pread(fd, n, start)
                if len(data) != n:
                    return None
                out += hasher.digests(data)
                content.update(data)
                start += n
            pos = end
        if pos < size:
            out += hasher.zero_run(size - pos)
        if _sig(os.fstat(fd)) != expect:
            return None
        return bytes(out), content.digest()
    except OSError:
        return None
    finally:
        os.close(fd)


# The helper is a plain child process (python -m deltavault.backup.pagedigests) speaking
# framed msgpack (deltavault.framing) over its stdin/stdout. multiprocessing's spawn would
# re-import the caller's __main__ module, re-running an unguarded script that uses deltavault
# as a library. Messages: first the key ([key or None]), then requests [id, path, signature,
# extents] answered by [id, digests, content hash] (both None when the file was not the one
# the caller read).
def _recv(stream: IO[bytes]) -> Any:
    got = read_frame(stream)
    return None if got is None else got[0]


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    first = _recv(inp)
    if first is None:
        return
    _init(first[0])
    while (req := _recv(inp)) is not None:
        rid, path, sig, extents = req
        res = file_digests(path, tuple(sig), [tuple(e) for e in extents])
        write_frame(out, [rid, *(res or (None, None))])


class PageDigester:
    """One helper process, started on first use; digests in this process if it cannot start."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._waiting: dict[int, Future[tuple[bytes, bytes] | None]] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._broken = False

    def _start(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "deltavault.backup.pagedigests"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        assert self._proc.stdin is not None
        write_frame(self._proc.stdin, [self.key])
        self._reader = threading.Thread(target=self._read_answers, name="dv-digest-reader", daemon=True)
        self._reader.start()

    def _read_answers(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while (msg := _recv(self._proc.stdout)) is not None:
            with self._lock:
                fut = self._waiting.pop(msg[0], None)
            if fut is not None:
                fut.set_result(None if msg[1] is None else (msg[1], msg[2]))
        with self._lock:  # the helper is gone: whoever still waits gets no digests
            self._broken = True
            waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            fut.set_result(None)

    def submit(self, path: bytes, st: os.stat_result,
               extents: list[tuple[int, int]]) -> Future[tuple[bytes, bytes] | None]:
        """Digests and content hash of the file at ``path`` over the ``extents`` the caller
        reads; the caller keeps the digests only if its own content hash is the same."""
        fut: Future[tuple[bytes, bytes] | None] = Future()
        with self._lock:
            if not self._broken:
                rid: int | None = None
                try:
                    if self._proc is None:
                        self._start()
                    assert self._proc is not None and self._proc.stdin is not None
                    rid = self._next
                    self._next += 1
                    self._waiting[rid] = fut
                    write_frame(self._proc.stdin, [rid, path, list(_sig(st)), [list(e) for e in extents]])
                    return fut
                except (OSError, ValueError):
                    self._broken = True
                    if rid is not None:
                        self._waiting.pop(rid, None)
        _init(self.key)
        fut.set_result(file_digests(path, _sig(st), extents))
        return fut

    def close(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        proc.wait(timeout=60)
        if self._reader is not None:
            self._reader.join(timeout=10)
        self._proc = None


if __name__ == "__main__":
    # The parent handles Ctrl-C (the terminal sends it to both) and ends this helper by
    # closing its stdin; if the parent died instead, there is no one left to answer.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:
        os._exit(0)
