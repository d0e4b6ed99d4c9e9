"""NTFS metadata in a local sync (``--acl``: security descriptor, DOS attributes, times;
``--streams``: named streams) from an ntfs-3g SRC, connecting sender/ntfs.py and
receiver/ntfs.py. DST on ntfs-3g gets them byte for byte; any other DST keeps small streams
as ``user.`` xattrs, and each file's log line names what it could not keep."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import blake3

from deltavault.fs.clone import pread_full, pwrite_all
from deltavault.fs.dirfd import expect_identity, fd_path, handle_at, identity
from deltavault.fs.ntfs import (
    STREAM_XATTR_MAX,
    XATTR,
    XATTR_STREAM,
    NtfsView,
    ReadResult,
    drop_cached,
    open_stream_file,
    probe,
    read_meta,
    valid_stream_name,
)
from deltavault.fs.ntfsstage import private
from deltavault.fs.paths import display
from deltavault.sync.data import BufferPool, copy_data
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.dirstreams import Opener, put_dir_streams
from deltavault.sync.receiver.ntfs import NtfsDest, StreamVerifyFailed, verify_stream
from deltavault.sync.report import Outcomes
from deltavault.sync.sender.ntfs import NtfsSource, dir_streams

_CHUNK = 1 << 20


def _chunk(fd: int, off: int) -> bytes:
    """Up to _CHUNK bytes of ``fd`` from ``off``: fewer only at its end."""
    buf = bytearray(_CHUNK)
    return bytes(buf[:pread_full(fd, memoryview(buf), off)])


@dataclass
class FileNtfs:
    """One file's NTFS metadata on its way, and what came of it."""

    meta: ReadResult
    problems: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    verified: int = 0  # stream bytes read back (--verify)
    bad: list[str] = field(default_factory=list)  # streams that read back other bytes

    def note(self) -> str | None:
        return "NTFS not kept on DST: " + ", ".join(self.lost) if self.lost else None


class LocalNtfs:
    def __init__(self, src: NtfsSource, dst: NtfsDest, opts: SyncOptions, buffers: BufferPool,
                 cancelled: Callable[[], bool]) -> None:
        self.src, self.dst, self.opts = src, dst, opts
        self.buffers = buffers
        self.cancelled = cancelled
        self._noted: set[bytes] = set()  # directories whose streams DST could not keep (counted)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, sroot: int, droot: int, opts: SyncOptions, buffers: BufferPool,
             cancelled: Callable[[], bool]) -> LocalNtfs | None:
        """When SRC is on ntfs-3g and --acl or --streams asks for it."""
        if not (opts.acl or opts.streams) or sroot < 0:
            return None
        view = probe(sroot)
        if view is None:
            return None
        return cls(NtfsSource(view, streams=opts.streams), NtfsDest(probe(droot)), opts, buffers, cancelled)

    @property
    def xattr_streams(self) -> bool:
        """Streams go to DST as ``user.`` xattrs, mirrored with the xattrs (DST is not
        ntfs-3g with streams_interface=windows, nor with xattr: there they are xattrs too)."""
        return self.opts.streams and not self.dst.file_streams

    def with_stream_xattrs(self, xattrs: list[tuple[bytes, bytes]] | None, sdir: int, name: bytes,
                           ino: int) -> tuple[list[tuple[bytes, bytes]], list[str]]:
        """SRC's xattrs and its small streams as ``user.`` xattrs (``xattr_streams``), and
        what could not be (streams over 64 KiB)."""
        return self.src.with_stream_xattrs(xattrs, sdir, name, ino)

    # ------------------------------------------------------------------ files
    def streams(self, sdir: int, name: bytes, fd: int, dfd: int, tmp: bytes, tfd: int) -> FileNtfs:
        """Read the source file's NTFS metadata and write its streams into the file being
        staged as ``tmp:stream`` (before its times are set: writing a stream changes them),
        while it lies in a directory of our own (fs/ntfsstage.py).
        Onto any other DST the streams travel as xattrs (``with_stream_xattrs``)."""
        meta = self.src.read(fd)
        f = FileNtfs(meta, [*meta.warnings, *meta.losses])
        if not self.opts.streams or not self.dst.file_streams:
            return f
        ino = os.fstat(fd).st_ino
        for s in meta.stream_names:
            if not valid_stream_name(s):
                f.problems.append(f"stream {display(s)}: name not valid on DST; not copied")
        names = [s for s in meta.stream_names if valid_stream_name(s)]
        try:
            with private(dfd, tmp, tfd) if names else nullcontext((dfd, tmp)) as (pfd, ptmp):
                for s in names:
                    try:
                        if s in meta.inline:
                            self._stream_bytes(meta.inline[s], pfd, ptmp, tfd, s, f)
                        else:
                            self._stream_file(sdir, name, ino, pfd, ptmp, tfd, s, f)
                    except OSError as exc:
                        f.problems.append(f"stream {display(s)}: {exc.strerror or exc}; not copied")
        except OSError as exc:
            f.problems.append(f"streams: {exc.strerror or exc}; not copied")
        if f.bad:
            raise StreamVerifyFailed("; ".join(f.bad))
        return f

    def _stream_file(self, sdir: int, name: bytes, ino: int, dfd: int, tmp: bytes, tfd: int, s: bytes,
                     f: FileNtfs) -> None:
        sfd = self.src.open_stream(sdir, name, s, ino)
        try:
            ofd = self.dst.open_stream(dfd, tmp, tfd, s)
            try:
                hasher = blake3.blake3() if self.opts.verify else None
                st = os.fstat(sfd)
                copy_data(sfd, ofd, st, self.buffers, hasher, self.cancelled)
                if hasher is not None:
                    self._verify(dfd, tmp, tfd, ofd, s, st.st_size, hasher.digest(), f)
            finally:
                os.close(ofd)
        finally:
            os.close(sfd)

    def _stream_bytes(self, data: bytes, dfd: int, tmp: bytes, tfd: int, s: bytes, f: FileNtfs) -> None:
        ofd = self.dst.open_stream(dfd, tmp, tfd, s)
        try:
            pwrite_all(ofd, data, 0)
            if self.opts.verify:
                self._verify(dfd, tmp, tfd, ofd, s, len(data), blake3.blake3(data).digest(), f)
        finally:
            os.close(ofd)

    def _verify(self, dfd: int, tmp: bytes, tfd: int, ofd: int, s: bytes, size: int, digest: bytes,
                f: FileNtfs) -> None:
        """--verify: the stream read back (as the file's data is, by the receiver)."""
        os.fsync(ofd)
        n, problem = verify_stream(dfd, tmp, tfd, s, size, digest, self.buffers.size)
        f.verified += n
        if problem is not None:
            f.bad.append(problem)

    def finish(self, f: FileNtfs, tfd: int) -> None:
        """The rest of the metadata, after the file's own (--acl)."""
        if self.opts.acl:
            problems, lost = self.dst.apply(tfd, f.meta)
            f.problems += problems
            f.lost += lost

    # ------------------------------------------------------------------ kept files, directories
    def fix_kept(self, sdir: int, name: bytes, dfd: int, dst: os.stat_result) -> list[str]:
        """A file DST keeps (same size and mtime): its descriptor, attributes and times set
        again if they differ (changing them changes only the ctime, which sync does not compare)."""
        if not self.opts.acl or self.dst.view is None:
            return []
        sh, _ = handle_at(sdir, name)
        try:
            dh, _ = expect_identity(dfd, name, identity(dst))
        except BaseException:
            os.close(sh)
            raise
        try:
            src = self.src.read(fd_path(sh))
            if self.dst.same(src, read_meta(fd_path(dh), self.dst.view, streams=False)):
                return []
            return self.dst.apply(fd_path(dh), src)[0]
        finally:
            os.close(sh)
            os.close(dh)

    def streams_changed(self, sdir: int, name: bytes, src: os.stat_result, dfd: int, dst: os.stat_result, *,
                        content: bool = False) -> bool:
        """Must a file of the same size and mtime as DST's (the caller checks) be copied
        again for its streams (--streams, DST taking them as files)? Yes when their names or
        sizes differ from DST's, or when it has streams on either side and its ctime is
        later than DST's (DST's copy was written before SRC last changed). On ntfs-3g a
        stream removed moves no time at all, one written in place the mtime (windows
        interface; xattr interface: the ctime only), which may be set back; any write moves
        the ctime, which cannot be set (docs/windows.md). ``content`` (--checksum): also
        when their bytes differ. A file that cannot be looked at here is copied: the copy
        names what fails."""
        if not self.opts.streams or not self.dst.file_streams or self.dst.view is None:
            return False
        try:
            mine = self._stream_sizes(sdir, name, identity(src), self.src.view)
            theirs = self._stream_sizes(dfd, name, identity(dst), self.dst.view)
        except OSError:
            return True
        if mine != theirs:
            return True
        if mine and src.st_ctime_ns > dst.st_ctime_ns:
            return True
        try:
            return content and any(not self._same_stream(sdir, name, src.st_ino, dfd, dst.st_ino, s) for s in mine)
        except OSError:
            return True

    def _same_stream(self, sdir: int, name: bytes, sino: int, dfd: int, dino: int, s: bytes) -> bool:
        """Stream ``s`` of SRC's file and of DST's holds the same bytes."""
        if not valid_stream_name(s):
            return False
        inline = None
        if self.src.view.streams == XATTR:  # (SRC's streams are its user.* xattrs)
            h, _ = expect_identity(sdir, name, (os.fstat(sdir).st_dev, sino))
            try:
                inline = os.getxattr(fd_path(h), XATTR_STREAM + s)
            finally:
                os.close(h)
        a = b = -1
        try:
            a = open_stream_file(sdir, name, s) if inline is None else -1
            b = open_stream_file(dfd, name, s)
            if (sino if a < 0 else os.fstat(a).st_ino, os.fstat(b).st_ino) != (sino, dino):
                return False
            off = 0
            while True:
                x = inline[off:off + _CHUNK] if inline is not None else _chunk(a, off)
                y = _chunk(b, off)
                if x != y:
                    return False
                if not x:
                    return True
                off += len(x)
        finally:
            for fd in (a, b):
                if fd >= 0:
                    drop_cached(fd)  # (else a reader of name:stream may see them after a rename over name)
                    os.close(fd)

    @staticmethod
    def _stream_sizes(dir_fd: int, name: bytes, ident: tuple[int, int], view: NtfsView) -> dict[bytes, int]:
        """The named streams of the file ``name`` of ``dir_fd`` (checked to be ``ident``)
        and their sizes; ESTALE when it is another file by now."""
        h, _ = expect_identity(dir_fd, name, ident)
        try:
            meta = read_meta(fd_path(h), view)
        finally:
            os.close(h)
        return {s: len(meta.inline[s]) if s in meta.inline else
                os.stat(name + b":" + s, dir_fd=dir_fd, follow_symlinks=False).st_size if valid_stream_name(s) else -1
                for s in meta.stream_names}

    def streams_may_differ(self, fd: int, dfd: int, name: bytes, dst: os.stat_result) -> bool:
        """A file of the same data and another mtime (the caller checks) is copied again when
        it has streams on either side: a stream write moves only its file's mtime (ntfs-3g
        says no more)."""
        if not self.opts.streams or not self.dst.file_streams or self.dst.view is None:
            return False
        if read_meta(fd, self.src.view).stream_names:
            return True
        dh, _ = expect_identity(dfd, name, identity(dst))
        try:
            return bool(read_meta(fd_path(dh), self.dst.view).stream_names)
        finally:
            os.close(dh)

    def dir_streams(self, parent_sfd: int, parent_dfd: int, name: bytes, sfd: int, dfd: int, rel: bytes,
                    xattrs: list[tuple[bytes, bytes]] | None, out: Outcomes) -> list[tuple[bytes, bytes]] | None:
        """--streams: a directory's own named streams (``name:stream`` in its parent). Onto
        ntfs-3g written now, before its times are set, each copied from SRC's through the
        sync's buffers (any size; never held whole); onto anything else returned with its
        xattrs (those up to 64 KiB, read whole), what could not be named in the log now and
        counted."""
        sst = os.fstat(sfd)
        if not self.opts.streams or os.fstat(parent_sfd).st_dev != sst.st_dev:  # (a mount: not "name:stream")
            return xattrs
        ino = sst.st_ino
        left: list[str] = []
        streams: dict[bytes, bytes] = {}
        try:
            if self.dst.file_streams:
                problems = self._put_dir_streams(parent_sfd, parent_dfd, name, ino, dfd)
            else:
                streams, left, problems = dir_streams(self.src, parent_sfd, name, ino, STREAM_XATTR_MAX)
        except OSError as exc:
            problems = [f"NTFS streams: {exc.strerror or exc}"]
        for m in problems:
            out.problem(rel, "metadata", m)
        if self.dst.file_streams:
            return xattrs
        if left:
            with self._lock:
                self._noted.add(rel)
            out.count(ntfs_not_kept=1)
            out.note(rel, "NTFS not kept on DST: " + ", ".join(left))
        merged = dict(xattrs or [])
        merged.update((XATTR_STREAM + s, v) for s, v in streams.items())
        return sorted(merged.items())

    def _put_dir_streams(self, parent_sfd: int, parent_dfd: int, name: bytes, ino: int, dfd: int) -> list[str]:
        """SRC's directory ``name`` (inode ``ino``) gives DST's (open as ``dfd``) its streams."""
        h, _ = handle_at(parent_sfd, name)
        try:
            meta = read_meta(fd_path(h), self.src.view)
        finally:
            os.close(h)
        streams: dict[bytes, bytes | Opener] = {}
        for s in meta.stream_names:
            streams[s] = meta.inline[s] if s in meta.inline else partial(self.src.open_stream, parent_sfd, name, s, ino)
        problems = put_dir_streams(parent_dfd, name, dfd, streams, (self.buffers.get(0), self.buffers.get(1)))
        return [*meta.losses, *problems]

    def read_dir(self, sfd: int) -> ReadResult | None:
        return read_meta(sfd, self.src.view, streams=False) if self.opts.acl else None

    def finish_dir(self, dfd: int, rel: bytes, meta: ReadResult, out: Outcomes) -> None:
        """A directory's NTFS metadata, after its POSIX metadata; what DST could not keep
        goes in the log, counted."""
        problems, lost = self.dst.apply(dfd, meta)
        for m in problems:
            out.problem(rel, "metadata", m)
        if lost:
            with self._lock:
                counted = rel in self._noted  # (its streams were named already: one entry)
            if not counted:
                out.count(ntfs_not_kept=1)
            out.note(rel, "NTFS not kept on DST: " + ", ".join(lost))
