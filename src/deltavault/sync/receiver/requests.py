"""The agent's answers to the sender's requests about DST (the protocol is in sync/wire.py):
for each directory listed, what to fetch of each entry ("whole", "delta", or "check" its
digest first) after deleting extras and placing what needs no data; the digests checked;
files received; a directory's end (its metadata, or --skip-empty-dirs).

Directories are known by path; ``OpenDirs`` reopens each, checked, when a request names
it. A directory that gets hard links has its metadata set at the end, after the links.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from deltavault.fs.dirfd import Identity, Replaced, identity, lstat_at
from deltavault.fs.ntfs import drop_cached, open_stream_file, valid_stream_name
from deltavault.fs.paths import check_name
from deltavault.sync.data import file_digest
from deltavault.sync.receiver.core import Receiver
from deltavault.sync.receiver.dirs import OpenDirs
from deltavault.sync.receiver.entries import open_existing
from deltavault.sync.receiver.incoming import receive_delta, receive_whole
from deltavault.sync.receiver.records import AgentOutcomes
from deltavault.sync.receiver.temps import Where
from deltavault.sync.remote import DELTA_MAX
from deltavault.sync.tree import join
from deltavault.sync.wire import GROUP, Entry, Frames, Paths


class Requests:
    def __init__(self, chan: Frames, rx: Receiver, out: AgentOutcomes, dirs: OpenDirs, path: Paths) -> None:
        self.chan, self.rx, self.out, self.dirs, self._path = chan, rx, out, dirs, path
        self.opts = rx.opts
        self.created: set[bytes] = set()  # directories this run made (nothing in them to compare)
        self.link_dirs: set[bytes] = set()  # directories that get hard links at the end
        self.deferred: list[tuple[bytes, Entry, Identity]] = []  # their metadata, set after the links

    def _where(self, rel: bytes) -> Where:
        return rel, self.dirs.ids.get(rel)

    # ------------------------------------------------------------------ directories
    def dir(self, req: dict[str, Any]) -> list[list[Any]]:
        """A listing: returns what is wanted of its entries."""
        rel = self._path(req["path"])
        want: list[list[Any]] = []
        if self.out.fatal is None and self.dirs.known(rel):  # (else not made: reported already)
            try:
                want = self._sync_dir(rel, [Entry(e) for e in req["entries"]],
                                      {check_name(n) for n in req["protected"]}, bool(req.get("included")))
            except OSError as exc:
                self.out.os_problem(rel, exc)
        return want

    def _sync_dir(self, rel: bytes, entries: list[Entry], protected: set[bytes],
                  included: bool) -> list[list[Any]]:
        dfd = self.dirs.get(rel)
        fresh = rel in self.created
        if self.opts.delete and not fresh:
            self.rx.delete_extras(dfd, rel, {e.name for e in entries} | protected, included)
        want: list[list[Any]] = []
        for e in entries:
            crel = join(rel, e.name)
            try:
                how = self._entry(dfd, rel, crel, e, fresh)
            except OSError as exc:
                self.out.os_problem(crel, exc)
                if self.out.fatal is not None:
                    return []
                continue
            if how is not None:
                want.append([e.name, how])
        return want

    def _entry(self, dfd: int, rel: bytes, crel: bytes, e: Entry, fresh: bool) -> str | None:
        """What to ask the sender for: "whole", "delta", "check" (its digest), or nothing."""
        dst = None if fresh else lstat_at(dfd, e.name)
        if e.kind == "d":
            self._subdir(dfd, rel, crel, e, dst)
            return None
        if dst is not None and stat.S_ISDIR(dst.st_mode):
            if not self.rx.clear_dir(dfd, e.name, crel):
                return None
            dst = None
        if e.kind == "h":
            self.rx.groups.add(crel, self._path(e.extra))
            self.link_dirs.add(rel)
            return None
        if e.kind in ("l", "s"):
            self.rx.special(dfd, self._where(rel), e.name, crel, e.st, e.extra or b"",
                            e.xattrs if e.kind != "l" else None)
            return None
        if dst is None or not stat.S_ISREG(dst.st_mode):
            return "whole"
        if dst.st_size == e.st.st_size:
            moved = dst.st_mtime_ns != e.st.st_mtime_ns
            if self.rx.ntfs is not None and self.rx.ntfs.streams_differ(dfd, e.name, e.win, dst, moved):
                return self._changed_how(dst, e)  # (each stream then goes whole or by delta)
            if self.opts.checksum or moved:
                return "check"
            return self._same(dfd, crel, e, dst)
        return self._changed_how(dst, e)

    def _subdir(self, dfd: int, rel: bytes, crel: bytes, e: Entry, dst: os.stat_result | None) -> None:
        got = self.rx.subdir(dfd, e.name, crel, dst, e.st, self.dirs.mounts[rel])
        if got is None:
            return
        fd, _st, made, mnt = got
        if made:
            self.created.add(crel)
            self.out.done("mkdir", crel)
        if self.rx.ntfs is not None and e.win is not None and e.win.inline is not None:
            try:
                self.rx.meta_problems(crel, self.rx.ntfs.dir_streams(dfd, e.name, fd, crel, e.win))
            except BaseException:
                os.close(fd)
                raise
        self.dirs.record(crel, fd, mnt)  # (closes fd)

    def _changed_how(self, dst: os.stat_result, e: Entry) -> str:
        small = min(dst.st_size, e.st.st_size) < self.opts.delta_min
        return "whole" if not self.opts.delta or small or max(dst.st_size, e.st.st_size) > DELTA_MAX else "delta"

    def enddir(self, req: dict[str, Any]) -> None:
        """A directory's end: everything in it is in place."""
        rel = self._path(req["path"])
        e = Entry(req["e"])
        if self.out.fatal is not None or not self.dirs.known(rel):
            return
        try:
            fd = self.dirs.get(rel)
            if self.opts.skip_empty_dirs and rel and rel in self.created and not os.listdir(fd):
                pdir, _, name = rel.rpartition(b"/")
                self.dirs.forget(rel)
                os.rmdir(name, dir_fd=self.dirs.get(pdir))
                self.out.count(dirs_created=-1)
                return
            if rel in self.link_dirs:  # making the links would change its mtime
                self.deferred.append((rel, e, self.dirs.ids[rel]))
                return
            self._dir_meta(fd, rel, e)
        except OSError as exc:
            self.out.os_problem(rel, exc)
        finally:
            self.dirs.climb(rel)
            self.dirs.forget(rel)

    def _dir_fd(self, rel: bytes) -> int:
        """The fd of DST/rel for a file request; -1 when it cannot be written (reported)."""
        if self.out.fatal is not None or not self.dirs.known(rel):
            return -1
        try:
            return self.dirs.get(rel)
        except OSError as exc:
            self.out.os_problem(rel, exc)
            return -1

    # ------------------------------------------------------------------ regular files
    def _same(self, dfd: int, crel: bytes, e: Entry, dst: os.stat_result) -> str | None:
        """Content is equal: keep it (nothing wanted), or "whole" when it must be sent anew
        (its metadata differs, and it has other links, maybe to a file outside DST)."""
        kept = self.rx.keep(dfd, e.name, crel, e.st, dst, e.xattrs, group=e.extra == GROUP)
        if kept and self.rx.ntfs is not None:
            self.rx.meta_problems(crel, self.rx.ntfs.fix_kept(dfd, e.name, dst, e.win))
        return None if kept else "whole"

    def check(self, req: dict[str, Any]) -> list[list[Any]]:
        """Digests of files of the same size: returns what is wanted of those that differ."""
        rel = self._path(req["path"])
        want: list[list[Any]] = []
        dfd = self._dir_fd(rel) if req["items"] else -1
        for digest, raw_e in req["items"] if dfd >= 0 else []:
            e = Entry(raw_e)
            crel = join(rel, e.name)
            try:
                dst = os.stat(e.name, dir_fd=dfd, follow_symlinks=False)
                if self._digest_at(dfd, e.name, dst) == digest and self._same_streams(dfd, e, dst):
                    how = self._same(dfd, crel, e, dst)
                    if how is not None:
                        want.append([e.name, how])
                else:
                    want.append([e.name, self._changed_how(dst, e)])
            except OSError as exc:
                self.out.os_problem(crel, exc)
        return want

    def _same_streams(self, dfd: int, e: Entry, dst: os.stat_result) -> bool:
        """--checksum: DST's streams of the file hold the bytes SRC's do (their names and
        sizes were compared already: ``AgentNtfs.streams_differ``)."""
        if self.rx.ntfs is None or e.win is None or e.win.digests is None or not self.rx.ntfs.file_streams:
            return True
        buf = self.rx.buffers.get(0)
        for s, want in e.win.digests.items():
            if not valid_stream_name(s):
                continue  # (named when the file is sent; never joined into a path)
            try:
                sfd = open_stream_file(dfd, e.name, s)
            except OSError:
                return False  # (gone since its name was listed: the file is sent again)
            try:
                if os.fstat(sfd).st_ino != dst.st_ino or file_digest(sfd, buf) != want:
                    return False
            finally:
                drop_cached(sfd)  # (pages of name:stream outlive a rename over name: fs/ntfs.py)
                os.close(sfd)
        return True

    def _digest_at(self, dfd: int, name: bytes, dst: os.stat_result) -> bytes:
        fd = open_existing(dfd, name, dst, os.O_RDONLY)
        try:
            return file_digest(fd, self.rx.buffers.get(0))
        finally:
            os.close(fd)

    def put(self, req: dict[str, Any]) -> None:
        rel = self._path(req["path"])
        e = Entry(req["e"])
        receive_whole(self.chan, self.rx, self._dir_fd(rel), self._where(rel), join(rel, e.name), e)

    def delta(self, req: dict[str, Any]) -> None:
        rel = self._path(req["path"])
        e = Entry(req["e"])
        receive_delta(self.chan, self.rx, self._dir_fd(rel), self._where(rel), join(rel, e.name), e)

    # ------------------------------------------------------------------ the end
    def finish(self) -> None:
        """Hard links, then the metadata of the directories that got them."""
        self.rx.make_links()
        for rel, e, ident in self.deferred:
            self._deferred_meta(rel, e, ident)

    def _deferred_meta(self, rel: bytes, e: Entry, ident: Identity) -> None:
        try:
            fd = self.dirs.get(rel)  # reopened from DST's root, each level checked
            if identity(os.fstat(fd)) != ident:
                raise Replaced("another directory stands here")
            self._dir_meta(fd, rel, e)
        except OSError as exc:
            self.out.os_problem(rel, exc)
        finally:
            self.dirs.forget(rel)

    def _dir_meta(self, fd: int, rel: bytes, e: Entry) -> None:
        ntfs = self.rx.ntfs
        self.rx.dir_meta(fd, rel, e.st, ntfs.dir_xattrs(rel, e.xattrs) if ntfs is not None else e.xattrs)
        if ntfs is not None:
            ntfs.finish_dir(fd, rel, e.win, self.out)
