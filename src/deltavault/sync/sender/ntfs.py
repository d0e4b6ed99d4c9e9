"""The sending side's view of NTFS metadata: a source entry's descriptor, attributes, times
and the names of its named streams (fs/ntfs.py), and a stream opened for reading as the file
``name:stream`` through a handle checked to be the same inode.

``SenderNtfs`` is a sync with another host's part (feature "ntfs", sync/wire.py): each
entry's ``win`` field, and a file's streams served to the agent after its content, whole or
by remote delta. With an agent that does not speak "ntfs" (an older deltavault) no ``win``
travels: the data is sent, and this side's log names, entry by entry, what was not kept."""

from __future__ import annotations

import errno
import os
from typing import Any

import blake3

from deltavault.fs.dirfd import fd_path, handle_at
from deltavault.fs.meta import INLINE_MAX
from deltavault.fs.ntfs import (
    STREAM_XATTR_MAX,
    WINDOWS,
    XATTR,
    XATTR_STREAM,
    NtfsView,
    ReadResult,
    drop_cached,
    not_kept,
    open_stream_file,
    read_meta,
    valid_stream_name,
)
from deltavault.fs.paths import display
from deltavault.sync.data import file_digest, read_upto
from deltavault.sync.remote import DELTA_MAX, Served
from deltavault.sync.report import Outcomes
from deltavault.sync.sender.source import changed_since
from deltavault.sync.wire import Frames, win_wire

Xattrs = list[tuple[bytes, bytes]] | None
DIR_STREAM_MAX = 1 << 20  # a directory's streams travel in its parent's listing, each up to this


class NtfsSource:
    def __init__(self, view: NtfsView, *, streams: bool) -> None:
        self.view = view
        self.streams = streams

    def read(self, target: int | bytes) -> ReadResult:
        """Metadata of the open entry ``target`` (fd, or /proc/self/fd path of a handle)."""
        return read_meta(target, self.view, streams=self.streams)

    def open_stream(self, dir_fd: int, name: bytes, stream: bytes, ino: int) -> int:
        """The stream ``stream`` of the file ``name`` of ``dir_fd``, open for reading; it
        must belong to inode ``ino`` (the file being copied), else ESTALE."""
        fd = open_stream_file(dir_fd, name, stream)
        if os.fstat(fd).st_ino != ino:
            os.close(fd)
            raise OSError(errno.ESTALE, "the file was replaced while its streams were read")
        return fd

    def with_stream_xattrs(self, xattrs: Xattrs, sdir: int, name: bytes,
                           ino: int) -> tuple[list[tuple[bytes, bytes]], list[str]]:
        """SRC's xattrs and its small streams as ``user.`` xattrs (for a DST that keeps
        streams so), up to INLINE_MAX together (as many as names fit in the stream list:
        some 9,000), and what could not be (streams over 64 KiB, or past that)."""
        merged = dict(xattrs or [])
        lost: list[str] = []
        if self.view.streams != WINDOWS:
            return sorted(merged.items()), lost  # xattr interface: they are SRC's user.* already
        h, _ = handle_at(sdir, name)
        try:
            names = read_meta(fd_path(h), self.view).stream_names
        finally:
            os.close(h)
        held = 0
        for s in names:
            if not valid_stream_name(s):
                continue
            sfd = self.open_stream(sdir, name, s, ino)
            try:
                size = os.fstat(sfd).st_size
                if size > STREAM_XATTR_MAX or held + size > INLINE_MAX:
                    lost.append(f"stream {display(s)} ({size} bytes)")
                    continue
                merged[XATTR_STREAM + s] = os.pread(sfd, size, 0)
                held += size
            finally:
                os.close(sfd)
        return sorted(merged.items()), lost


def dir_streams(src: NtfsSource, parent: int, name: bytes, ino: int,
                limit: int) -> tuple[dict[bytes, bytes], list[str], list[str]]:
    """The named streams of the directory ``name`` of ``parent`` (inode ``ino``), read
    whole, up to INLINE_MAX together (as many as names fit in the stream list); those over
    ``limit`` bytes, or past that, are left out. Returns (the streams, what was left out,
    problems)."""
    got: dict[bytes, bytes] = {}
    left: list[str] = []
    problems: list[str] = []
    h, _ = handle_at(parent, name)
    try:
        meta = read_meta(fd_path(h), src.view)
    finally:
        os.close(h)
    problems += meta.losses
    held = 0
    for s in meta.stream_names:
        if s in meta.inline:  # (read_meta holds them to INLINE_MAX)
            got[s] = meta.inline[s]
            held += len(got[s])
            continue
        if not valid_stream_name(s):
            problems.append(f"stream {display(s)}: a name no stream can have; not read")
            continue
        try:
            sfd = src.open_stream(parent, name, s, ino)
        except OSError as exc:
            problems.append(f"stream {display(s)}: {exc.strerror or exc}; not copied")
            continue
        try:
            size = os.fstat(sfd).st_size
            if size > limit or held + size > INLINE_MAX:
                left.append(f"stream {display(s)} ({size} bytes)")
                continue
            got[s] = _read_all(sfd, size)
            held += size
        finally:
            os.close(sfd)
    return got, left, problems


def _read_all(fd: int, size: int) -> bytes:
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        n = os.preadv(fd, [view[got:]], got)
        if n == 0:
            break
        got += n
    return bytes(data[:got])


class SenderNtfs:
    """NTFS metadata and streams sent to an agent. ``dest_streams``: how DST shows streams
    (the agent's hello; None when DST is not ntfs-3g). ``peer``: the agent speaks "ntfs";
    else ``xattrs`` (--xattrs) says whether it mirrors ``user.`` xattrs, which small streams
    can travel as."""

    def __init__(self, src: NtfsSource, *, acl: bool, streams: bool, dest_streams: str | None,
                 peer: bool = True, xattrs: bool = False) -> None:
        self.src, self.acl, self.streams, self.peer = src, acl, streams, peer
        self.file_streams = peer and streams and dest_streams == WINDOWS
        # (an older agent keeps user.* xattrs only under --xattrs: it knows nothing of streams)
        self.xattr_streams = streams and not self.file_streams and (peer or xattrs)
        self._dirs: dict[bytes, list[str]] = {}  # no peer: what a directory loses, logged at its end

    def file_win(self, dir_fd: int, name: bytes, target: int | bytes, st: os.stat_result,
                 xattrs: Xattrs) -> tuple[Xattrs, dict[str, Any] | None, ReadResult, list[str]]:
        """A file's xattrs (with its small streams, for a DST that keeps them as xattrs),
        its ``win`` field (None: no peer), what was read (for its warnings), and, without a
        peer, what DST does not get (for its log line). ``target``: the open file, or a
        /proc path naming it."""
        blind = not self.peer and self.streams and not self.xattr_streams  # (streams named as not kept)
        meta = read_meta(target, self.src.view, streams=self.file_streams or blind)
        lost: list[str] = []
        if self.xattr_streams:
            xattrs, lost = self.src.with_stream_xattrs(xattrs, dir_fd, name, st.st_ino)
        sizes: dict[bytes, int] = {}
        for s in meta.stream_names:
            if s in meta.inline:
                sizes[s] = len(meta.inline[s])
            elif valid_stream_name(s):  # (else the agent names it, and asks nothing)
                sizes[s] = os.stat(name + b":" + s, dir_fd=dir_fd, follow_symlinks=False).st_size
            else:
                sizes[s] = 0
        if not self.peer:
            lost += [f"stream {display(s)} ({n} bytes)" for s, n in sizes.items()]
            return xattrs, None, meta, lost + (not_kept(meta) if self.acl else [])
        return xattrs, win_wire(self._asked(meta), streams=sizes, lost=lost), meta, []

    def stream_digests(self, dir_fd: int, name: bytes, ino: int, meta: ReadResult,
                       buf: memoryview) -> list[list[bytes]]:
        """[[stream, BLAKE3], ...] of a file's streams sent as files (--checksum: the agent
        compares them with DST's, as it does the file's data)."""
        out = []
        for s in meta.stream_names:
            if s in meta.inline:
                out.append([s, blake3.blake3(meta.inline[s]).digest()])
            elif valid_stream_name(s):
                sfd = self.src.open_stream(dir_fd, name, s, ino)
                try:
                    out.append([s, file_digest(sfd, buf)])
                finally:
                    drop_cached(sfd)  # (pages of name:stream outlive a rename over name: fs/ntfs.py)
                    os.close(sfd)
        return out

    def subdir_win(self, parent: int, name: bytes, rel: bytes, st: os.stat_result) -> tuple[dict[str, Any] | None, list[str]]:
        """The ``win`` of a subdirectory's entry in its parent's listing: its own streams,
        up to DIR_STREAM_MAX (64 KiB onto a DST that keeps them as xattrs), the bigger ones
        named. Returns it (None without --streams) and the problems."""
        if not self.peer:
            return None, self._blind_dir_streams(parent, name, rel, st)
        if not (self.file_streams or self.xattr_streams) or os.fstat(parent).st_dev != st.st_dev:
            return None, []  # (a mount below: its streams are not "name:stream" of this parent)
        limit = DIR_STREAM_MAX if self.file_streams else STREAM_XATTR_MAX
        got, left, problems = dir_streams(self.src, parent, name, st.st_ino, limit)
        lost = [f"{x}: directory streams over {limit // 1024} KiB (or past {INLINE_MAX >> 20} MiB together) do not "
                "cross ssh" if self.file_streams else x for x in left]
        return win_wire(ReadResult(b"", "", None, b"", b"", []), lost=lost, inline=got), problems

    def _blind_dir_streams(self, parent: int, name: bytes, rel: bytes, st: os.stat_result) -> list[str]:
        """No peer: the directory's streams are not sent (their names and sizes are kept
        for its log line, at its end). Returns the problems."""
        if not self.streams or os.fstat(parent).st_dev != st.st_dev:
            return []
        if self.xattr_streams and self.src.view.streams == XATTR:
            return []  # its own user.* xattrs, mirrored under --xattrs
        got, left, problems = dir_streams(self.src, parent, name, st.st_ino, limit=-1)  # (-1: none read)
        self._dirs[rel] = [f"stream {display(s)} ({len(v)} bytes)" for s, v in got.items()] + left
        return problems

    def dir_win(self, fd: int, rel: bytes) -> tuple[dict[str, Any] | None, ReadResult | None]:
        """A directory's ``win`` (--acl; None without a peer), and what was read."""
        if not self.acl:
            return None, None
        meta = read_meta(fd, self.src.view, streams=False)
        if not self.peer:
            self._dirs[rel] = [*self._dirs.get(rel, []), *not_kept(meta)]
            return None, meta
        return win_wire(meta), meta

    def end_dir(self, rel: bytes, out: Outcomes) -> None:
        """No peer: a directory's end sent; what it did not get goes in the log, counted."""
        lost = self._dirs.pop(rel, None)
        if lost:
            out.count(ntfs_not_kept=1)
            out.note(rel, "NTFS not kept on DST: " + ", ".join(lost))

    def file_sent(self, rel: bytes, lost: list[str], out: Outcomes) -> None:
        """No peer: a file sent; what it did not get goes in the log, counted."""
        if lost:
            out.count(ntfs_not_kept=1)
            out.note(rel, "NTFS not kept on DST: " + ", ".join(lost))

    def _asked(self, meta: ReadResult) -> ReadResult:
        if self.acl:
            return meta
        return ReadResult(b"", "", None, b"", b"", meta.stream_names)

    def serve(self, chan: Frames, dir_fd: int, name: bytes, fd: int, st: os.stat_result,
              meta: ReadResult, bufsize: int) -> bool:
        """Answer the agent's requests for the streams of the file ``name`` (open as ``fd``,
        ``st`` when its content was read) until it says "bye". False when the file changed
        meanwhile (the agent was told, and discards it)."""
        ok = True
        served: Served | None = None
        while True:
            req = chan.recv()
            op = req.get("op") if isinstance(req, dict) else None
            if op == "bye":
                return ok
            s = req.get("path") if isinstance(req, dict) else None
            if op == "get" and served is not None:
                chan.send(served.get(req))
                continue
            if op not in ("whole", "open") or not isinstance(s, bytes) or s not in meta.stream_names \
                    or not valid_stream_name(s):
                chan.send({"error": f"unexpected request {op!r}", "abort": "unexpected request"})
                continue
            if op == "whole":
                ok = self._whole(chan, dir_fd, name, s, fd, st, meta, bufsize) and ok
                continue
            try:  # (remote delta holds the stream in memory, as it does a file: up to DELTA_MAX)
                data = self._load(dir_fd, name, s, st.st_ino, meta)
            except OSError as exc:
                chan.send({"error": f"unreadable: {exc.strerror or exc}"})
                continue
            if data is None or changed_since(st, os.fstat(fd)):
                ok = False
                chan.send({"error": "the file changed while its streams were read", "changed": True})
                continue
            served = Served(data, pages=bool(req.get("pages")))
            chan.send(served.head)

    def _whole(self, chan: Frames, dir_fd: int, name: bytes, s: bytes, fd: int, st: os.stat_result,
               meta: ReadResult, bufsize: int) -> bool:
        """One stream sent whole, in frames of ``bufsize``, then its BLAKE3; "abort" when it
        cannot be read (the agent names it) or the file changed meanwhile (False)."""
        h = blake3.blake3(max_threads=1)
        try:
            if s in meta.inline:
                data = meta.inline[s]
                h.update(data)
                chan.send({"d": data})
            else:
                sfd = self.src.open_stream(dir_fd, name, s, st.st_ino)
                try:
                    buf = memoryview(bytearray(max(4096, bufsize)))
                    # (not to EOF: its owner may extend it for ever)
                    for chunk in read_upto(sfd, buf, os.fstat(sfd).st_size):
                        h.update(chunk)
                        chan.send({"d": chunk})
                finally:
                    os.close(sfd)
        except OSError as exc:
            chan.send({"abort": f"unreadable: {exc.strerror or exc}"})
            return True
        if changed_since(st, os.fstat(fd)):
            chan.send({"abort": "changed"})
            return False
        chan.send({"end": h.digest()})
        return True

    def _load(self, dir_fd: int, name: bytes, s: bytes, ino: int, meta: ReadResult) -> bytes | None:
        """A stream's bytes, read whole (to its size at open); None when that is over
        DELTA_MAX. The agent asks for a delta only of a stream listed at most that big, so
        it grew since it was listed: the file changed (and is sent again). Read regardless,
        a stream truncated to some GiB (sparse: it costs its owner nothing) was held in
        memory; and a hostile agent could ask for any stream."""
        if s in meta.inline:
            return meta.inline[s]
        sfd = self.src.open_stream(dir_fd, name, s, ino)
        try:
            size = os.fstat(sfd).st_size
            return _read_all(sfd, size) if size <= DELTA_MAX else None
        finally:
            os.close(sfd)
