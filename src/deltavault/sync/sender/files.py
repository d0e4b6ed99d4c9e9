"""Files as the sender sends them: a digest for the agent to compare with its copy (same
size, other mtime, or --checksum), the whole file streamed with its holes sent as
lengths, or the file served to the agent's remote delta (sync/remote.py). Each is opened
through a checked handle (sender/source.py) and sent again, up to ``attempts`` times, if
it changes while it is read."""

from __future__ import annotations

import os
import stat
from functools import partial
from typing import Any

import blake3

from deltavault.fs.clone import pread_full
from deltavault.fs.paths import display
from deltavault.sync.data import (
    BufferPool,
    SourceChanged,
    SourceReadError,
    chunks,
    file_digest,
    hash_zeros,
    is_zero,
    read_source,
)
from deltavault.sync.options import SyncOptions
from deltavault.sync.remote import DELTA_MAX
from deltavault.sync.sender.link import AgentLink
from deltavault.sync.sender.ntfs import SenderNtfs
from deltavault.sync.sender.source import SourceTree, changed_since
from deltavault.sync.tree import join
from deltavault.sync.wire import entry


class FileSender:
    def __init__(self, link: AgentLink, source: SourceTree, opts: SyncOptions, buffers: BufferPool) -> None:
        self.link, self.source, self.opts, self.buffers = link, source, opts, buffers
        self.out, self.meta = source.out, source.meta
        self.ntfs: SenderNtfs | None = None  # NTFS metadata and streams (sync/wire.py, feature "ntfs")

    def digest(self, dfd: int, name: bytes, rel: bytes, listed: os.stat_result | None = None) -> list[Any] | None:
        """[BLAKE3, entry] of a file whose size matches the destination's (--checksum, or
        another mtime): the agent keeps its copy when the content is the same."""
        fd = self.source.open_file(dfd, name, rel, listed)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            digest = file_digest(fd, self.buffers.get(0), read_source)
            if changed_since(st, os.fstat(fd)):
                digest = b""  # of no one version: matches nothing, so the agent asks for the file
            xattrs = self.source.xattrs(rel, fd=fd)
            win = None
            if self.ntfs is not None:
                xattrs, win, meta, _ = self.ntfs.file_win(dfd, name, fd, st, xattrs)
                if win is not None and win["streams"] and self.opts.checksum:
                    win["digests"] = self.ntfs.stream_digests(dfd, name, st.st_ino, meta, self.buffers.get(0))
        except (SourceReadError, OSError) as exc:
            self.out.problem(rel, "unreadable", str(exc))
            return None
        finally:
            os.close(fd)
        return [digest, entry(name, "f", st, xattrs=xattrs, win=win)]

    def send(self, dfd: int, rel: bytes, name: bytes, listed: os.stat_result, how: str) -> None:
        crel = join(rel, name)
        for _attempt in range(self.opts.attempts):
            fd = self.source.open_file(dfd, name, crel, listed)
            if fd is None:
                return
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    self.out.problem(crel, "changed", "no longer a regular file")
                    return
                xattrs = self.source.xattrs(crel, fd=fd)
                win = meta = None
                lost: list[str] = []  # (an agent without "ntfs": what DST does not get)
                if self.ntfs is not None:
                    xattrs, win, meta, lost = self.ntfs.file_win(dfd, name, fd, st, xattrs)
                e = entry(name, "f", st, xattrs=xattrs, win=win)
                # The agent chose delta by the size listed; remote delta holds the file in
                # memory, so one grown past DELTA_MAX since (a sparse file truncated to 1 TiB)
                # is streamed whole instead, at the size opened.
                delta = how == "delta" and st.st_size <= DELTA_MAX
                sent = self._delta(fd, st, rel, e) if delta else self._put(fd, st, rel, e)
                if sent and self.ntfs is not None and meta is not None and win is not None and win["streams"]:
                    sent = self.link.serve_streams(partial(self.ntfs.serve, dir_fd=dfd, name=name, fd=fd, st=st,
                                                           meta=meta, bufsize=self.buffers.size))
                if sent and self.ntfs is not None:
                    self.ntfs.file_sent(crel, lost, self.out)
                if sent and meta is not None:  # (warnings: a descriptor kept as bytes; losses: unreadable)
                    for m in [*meta.warnings, *meta.losses] if self.opts.acl else meta.losses:
                        self.out.problem(crel, "metadata", m)
            except (SourceReadError, OSError) as exc:
                self.out.problem(crel, "unreadable", str(exc) if isinstance(exc, SourceReadError)
                                 else exc.strerror or str(exc), size=listed.st_size)
                return
            finally:
                os.close(fd)
            if sent:
                self.out.reporter.advance(nbytes=st.st_size, items=1, current=display(crel))
                return
        self.out.problem(crel, "changed", f"changed while being copied, {self.opts.attempts} times; the "
                         "destination keeps its previous version", size=listed.st_size)

    def _put(self, fd: int, st: os.stat_result, rel: bytes, e: list[Any]) -> bool:
        """Stream the file, holes (and runs of zeros) as lengths; False if it changed
        meanwhile (the agent discards it)."""
        self.link.send({"op": "put", "path": rel, "e": e})
        h = blake3.blake3(max_threads=1)
        try:
            for _off, n, data in chunks(fd, st, self.buffers.get(0)):
                if data is None or is_zero(data):
                    self._hole(h, n)
                else:
                    h.update(data)
                    self.link.send({"d": data})
        except SourceChanged:
            self.link.send({"abort": "changed"})
            return False
        except (SourceReadError, OSError):
            self.link.send({"abort": "unreadable"})
            raise
        if changed_since(st, os.fstat(fd)):
            self.link.send({"abort": "changed"})
            return False
        self.link.send({"end": h.digest()})
        return True

    def _hole(self, h: blake3.blake3, n: int) -> None:
        hash_zeros(h, n)
        self.link.send({"z": n})

    def _delta(self, fd: int, st: os.stat_result, rel: bytes, e: list[Any]) -> bool:
        """Let the agent fetch what its old version lacks; False if the file changed while read.
        The file is read once the agent asks, while the agent reads its old version: its
        ``st.st_size`` bytes (at most DELTA_MAX: ``send``), whatever it has grown to since."""
        changed = False

        def load() -> memoryview | None:
            nonlocal changed
            data = bytearray(st.st_size)
            if pread_full(fd, memoryview(data), 0) != st.st_size or changed_since(st, os.fstat(fd)):
                changed = True
                return None
            return memoryview(data)

        self.link.send({"op": "delta", "path": rel, "e": e})
        self.link.serve(load)
        return not changed
