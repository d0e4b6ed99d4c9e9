"""Regular files of a local sync: compared, staged and installed.

Small files are copied by the walking thread itself (they cost a dozen short system calls
each; handing them to threads costs more in GIL hand-offs than it saves), files from
THREAD_MIN on by a pool of copy threads. A file is written under a temp name (a reflink
clone of the old version, rewritten page by page, for a big changed file: local/delta.py)
and renamed into place by the shared receiver, so an interrupted run never leaves a
half-written file under a real name. A file that changes while it is read is copied again,
up to ``attempts`` times.
"""

from __future__ import annotations

import errno
import os
import stat
from concurrent.futures import Future

import blake3

from deltavault.errors import NO_SPACE_ERRNOS
from deltavault.fs.clone import pread_full, reflink
from deltavault.fs.dirfd import lstat_at
from deltavault.fs.meta import widens
from deltavault.fs.paths import proc_path
from deltavault.sync.data import Cancelled, SourceChanged, SourceReadError, copy_data, read_source
from deltavault.sync.local.context import LocalRun
from deltavault.sync.local.delta import page_delta
from deltavault.sync.local.dirs import Dir, Dirs
from deltavault.sync.receiver.core import Staged
from deltavault.sync.receiver.entries import Xattrs, open_existing, owned, single
from deltavault.sync.receiver.ntfs import StreamVerifyFailed
from deltavault.sync.sender.source import changed_since
from deltavault.workers import BoundedPool

THREAD_MIN = 1024 * 1024  # files from this size on are copied by the thread pool


class Files:
    def __init__(self, run: LocalRun, dirs: Dirs, pool: BoundedPool) -> None:
        self.run, self.dirs, self.pool = run, dirs, pool
        self._jobs: list[Future[None]] = []

    def submit(self, d: Dir, name: bytes, relpath: bytes, st: os.stat_result) -> None:
        self.dirs.job_started(d)
        if st.st_size < THREAD_MIN:
            self._job(d, name, relpath, st)
            return
        try:
            fut = self.pool.submit(self._job, d, name, relpath, st)
        except BaseException:
            self.dirs.job_done(d)
            raise
        self._jobs.append(fut)
        if len(self._jobs) > 4096:
            # A failed job is kept for wait() to raise: dropped with the finished ones, its
            # error (anything _job does not report itself) was never seen and the run passed.
            self._jobs = [j for j in self._jobs if not j.done() or (not j.cancelled() and j.exception() is not None)]

    def wait(self) -> None:
        for fut in self._jobs:
            if not fut.cancelled():
                fut.result()

    def _job(self, d: Dir, name: bytes, relpath: bytes, st: os.stat_result) -> None:
        try:
            if not self.run.cancel.is_set():
                self._sync(d, name, relpath, st)
        except Cancelled:
            pass
        except OSError as exc:
            self.run.out.os_problem(relpath, exc)
        finally:
            self.dirs.job_done(d)

    def _sync(self, d: Dir, name: bytes, relpath: bytes, st: os.stat_result) -> None:
        run, out, opts = self.run, self.run.out, self.run.opts
        sfd, dfd = d.sfd, d.dfd
        dst = None if d.fresh else lstat_at(dfd, name)
        if dst is not None and stat.S_ISDIR(dst.st_mode):
            if not run.rx.clear_dir(dfd, name, relpath):
                return
            dst = None
        dst_reg = dst if dst is not None and stat.S_ISREG(dst.st_mode) else None
        same_stat = dst_reg is not None and dst_reg.st_size == st.st_size and dst_reg.st_mtime_ns == st.st_mtime_ns
        # A stream changed may leave its file's size and mtime as they were (local/ntfs.py).
        streams_moved = (same_stat and run.ntfs is not None and dst_reg is not None
                         and run.ntfs.streams_changed(sfd, name, st, dfd, dst_reg, content=opts.checksum))
        if dst_reg is not None and same_stat and not opts.checksum and not streams_moved:
            xattrs, _lost = self._with_streams(run.source.xattrs(relpath, path=proc_path(sfd, name)), sfd, name,
                                               st.st_ino, relpath)
            if run.rx.keep(dfd, name, relpath, st, dst_reg, xattrs, group=st.st_nlink > 1):
                if run.ntfs is not None:
                    run.rx.meta_problems(relpath, run.ntfs.fix_kept(sfd, name, dfd, dst_reg))
                return
        for attempt in range(1, opts.attempts + 1):
            fd = run.source.open_file(sfd, name, relpath, st)
            if fd is None:
                return
            staged: Staged | None = None
            try:
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode):
                    out.problem(relpath, "changed", "no longer a regular file")
                    return
                xattrs, ntfs_lost = self._with_streams(run.source.xattrs(relpath, fd=fd), sfd, name,
                                                       fst.st_ino, relpath)
                # Same size, other mtime (or --checksum): often the same bytes (a reinstall, a
                # touch). Comparing costs a read of DST; copying would cost a write of it.
                if (dst_reg is not None and dst_reg.st_size == fst.st_size
                        and (opts.checksum or fst.st_size < opts.delta_min) and not streams_moved
                        and not (run.ntfs is not None and dst_reg.st_mtime_ns != fst.st_mtime_ns
                                 and run.ntfs.streams_may_differ(fd, dfd, name, dst_reg))
                        and self._same_content(fd, dfd, name, dst_reg, fst.st_size)
                        and run.rx.keep(dfd, name, relpath, fst, dst_reg, xattrs, group=fst.st_nlink > 1)):
                    return
                try:
                    staged = self._stage(fd, fst, d, name, relpath, dst_reg, xattrs, ntfs_lost)
                except SourceChanged:
                    staged = None
                after = os.fstat(fd)
            except SourceReadError as exc:
                out.problem(relpath, "unreadable", str(exc), size=st.st_size)
                return
            except StreamVerifyFailed as exc:  # (the staged file is discarded: DST keeps its previous version)
                out.problem(relpath, "verify", str(exc), size=st.st_size)
                return
            except OSError as exc:
                self._discard(d, staged)
                if exc.errno in NO_SPACE_ERRNOS or exc.errno == errno.EROFS:
                    raise
                out.problem(relpath, "write", exc.strerror or str(exc), size=st.st_size)
                return
            except BaseException:
                self._discard(d, staged)
                raise
            finally:
                os.close(fd)
            if staged is None or changed_since(fst, after):
                self._discard(d, staged)
                if attempt < opts.attempts:
                    continue
                out.problem(relpath, "changed",
                            f"changed while being copied, {opts.attempts} times; the destination keeps its "
                            "previous version" + (" (updated in place: may be mixed)"
                                                  if staged is not None and staged.tmp is None else ""),
                            size=fst.st_size)
                return
            run.rx.install(dfd, d.where, name, relpath, fst, staged, group=fst.st_nlink > 1)
            return

    def _with_streams(self, xattrs: Xattrs, sfd: int, name: bytes, ino: int,
                      relpath: bytes) -> tuple[Xattrs, list[str]]:
        """SRC's xattrs, with its small NTFS streams as ``user.`` xattrs when DST keeps them
        so (local/ntfs.py), and the streams that could not be."""
        ntfs = self.run.ntfs
        if ntfs is None or not ntfs.xattr_streams:
            return xattrs, []
        try:
            return ntfs.with_stream_xattrs(xattrs, sfd, name, ino)
        except OSError as exc:
            self.run.out.problem(relpath, "unreadable", f"NTFS streams: {exc.strerror or exc}")
            return xattrs, []

    def _discard(self, d: Dir, staged: Staged | None) -> None:
        if staged is not None and staged.tmp is not None:
            self.run.rx.discard(d.where, d.dfd, staged.tmp)

    def _same_content(self, fd: int, dfd: int, name: bytes, dst: os.stat_result, size: int) -> bool:
        try:
            ofd = open_existing(dfd, name, dst, os.O_RDONLY)
        except OSError:
            return False
        try:
            a, b = self.run.buffers.get(0), self.run.buffers.get(1)
            off = 0
            while off < size:
                n = read_source(fd, a, off)
                m = pread_full(ofd, b[:n], off)
                if n == 0 or m != n or a[:n].tobytes() != b[:n].tobytes():
                    return False
                off += n
            return True
        finally:
            os.close(ofd)

    def _stage(self, fd: int, st: os.stat_result, d: Dir, name: bytes, relpath: bytes,
               dst: os.stat_result | None, xattrs: Xattrs, ntfs_lost: list[str]) -> Staged:
        run, opts = self.run, self.run.opts
        hasher = blake3.blake3() if opts.verify else None
        if (dst is not None and opts.delta and st.st_size >= opts.delta_min
                and dst.st_size >= opts.delta_min and run.ntfs is None):  # (no clones on NTFS; streams)
            staged = self._stage_delta(fd, st, d, name, relpath, dst, xattrs, hasher)
            if staged is not None:
                return staged
        perm = stat.S_IMODE(st.st_mode) & 0o777
        # In a directory this run created (no default ACL, not setgid) a new file gets
        # (euid, egid) and perm & ~umask: then chown and chmod can be skipped.
        same_owner = d.fresh and (st.st_uid, st.st_gid) == run.ids
        same_mode = d.fresh and same_owner and perm == stat.S_IMODE(st.st_mode) and not perm & run.umask
        tmp, tfd = run.rx.new_file(d.where, d.dfd, name, perm if same_mode else 0o600)
        note = None
        try:
            written = copy_data(fd, tfd, st, run.buffers, hasher, run.cancel.is_set)
            win = run.ntfs.streams(d.sfd, name, fd, d.dfd, tmp, tfd) if run.ntfs is not None else None
            if win is not None and win.verified:
                run.out.count(bytes_verified=win.verified)
            ident = run.rx.finish_file(tfd, relpath, st, xattrs, chown=not same_owner, chmod=not same_mode)
            if win is not None and run.ntfs is not None:
                run.ntfs.finish(win, tfd)
                run.rx.meta_problems(relpath, win.problems)
                win.lost[:0] = ntfs_lost
                note = win.note()
        except BaseException:
            os.close(tfd)
            run.rx.discard(d.where, d.dfd, tmp)
            raise
        os.close(tfd)
        return Staged(tmp, "update" if dst is not None else "new", written, ident,
                      hasher.digest() if hasher is not None else None, note=note)

    def _stage_delta(self, fd: int, st: os.stat_result, d: Dir, name: bytes, relpath: bytes,
                     dst: os.stat_result, xattrs: Xattrs, hasher: blake3.blake3 | None) -> Staged | None:
        """Rewrite only the changed pages: into a clone of the old file, or (--inplace) into
        the old file itself, if DST holds its only link, it is ``owned`` and its mode lets
        nobody read it whom SRC's shuts out (``widens``: whoever opened it before the run
        would read SRC's new bytes through that fd). None: neither is possible here, copy
        the file whole. The old file is the one met in the listing (checked handle)."""
        run = self.run
        inplace = (run.opts.inplace and single(dst) and owned(dst, st, run.rx.meta)
                   and not widens(dst, st.st_mode, st.st_gid if run.rx.meta.chown else None))
        ofd = open_existing(d.dfd, name, dst, os.O_RDONLY)
        tmp: bytes | None = None
        tfd = -1
        try:
            if inplace:
                tfd = open_existing(d.dfd, name, dst, os.O_WRONLY)
            else:
                tmp, tfd = run.rx.new_file(d.where, d.dfd, name)
                if not reflink(ofd, tfd):
                    os.close(tfd)
                    tfd = -1
                    run.rx.discard(d.where, d.dfd, tmp)
                    return None
            res = page_delta(fd, ofd, tfd, st.st_size, dst.st_size, run.buffers, hasher, run.cancel.is_set)
            ident = run.rx.finish_file(tfd, relpath, st, xattrs)
        except BaseException:
            if tmp is not None:
                run.rx.discard(d.where, d.dfd, tmp)
            raise
        finally:
            os.close(ofd)
            if tfd >= 0:
                os.close(tfd)
        return Staged(tmp, "delta", res.written, ident, hasher.digest() if hasher is not None else None,
                      reflinked=not inplace)
