"""The receiving end of a push sync: run as ``deltavault sync-agent`` at the far end of ssh,
it mirrors what sync/push.py sends into a local directory.

The sender drives; the agent answers only "hello", "dir", "check" and "finish", and, while
it fetches a file by delta, makes requests of its own (sync/remote.py). So neither side
ever writes while the other is writing, and the pipes cannot deadlock.

    hello {version, dest, options}            -> {ok} | {error, code}
    dir {path, entries, protected, included}  -> {want: [[name, "whole"|"delta"|"check"]], records}
    check {path, items: [[blake3, entry]]}    -> {want, records}   (same size: is it the same content?)
    put {path, e} then {d: bytes} | {z: n} ... then {end: blake3} | {abort: why}
    delta {path, e} then the agent fetches the file (remote.fetch) and says "bye"
    enddir {path, e}                          (the directory's own metadata, after its contents)
    finish                                    -> {records, stats}

Every request that has a reply carries an "id", and its reply the same, so the sender can
keep several in flight (it lists the next directories while sending files of earlier ones).
Files are written under a temp name and renamed into place, as by the local engine.
A record is [action, path, size, written, digest, problem kind, message].
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import blake3

from deltavault.chunking import rdc
from deltavault.errors import (
    NO_SPACE_ERRNOS,
    CorruptionError,
    DeltavaultError,
    NoSpace,
    SourceError,
    TargetError,
)
from deltavault.fs.clone import pwrite_all, reflink
from deltavault.fs.paths import check_name, display, open_target_dir
from deltavault.progress import NullReporter, Reporter
from deltavault.sync.copy import BufferPool, file_digest, hash_zeros, is_zero
from deltavault.sync.dest import (
    delete_extras,
    fix_meta,
    hard_link,
    place_special,
    unlink_quiet,
    verify_written,
)
from deltavault.sync.filters import Filter
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.options import SyncOptions
from deltavault.sync.remote import Changed, Channel, Rebuilt, fetch_rebuilt
from deltavault.sync.report import SyncLog, SyncProblem, SyncStats
from deltavault.sync.tree import join, lstat_at, open_dir, remove_entry, temp_name
from deltavault.sync.wire import VERSION, Entry, options_from

DELTA_MAX = 2 << 30  # both versions are held in memory while a file is rebuilt by delta
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _path(raw: Any) -> bytes:
    if not isinstance(raw, bytes):
        raise CorruptionError("the sender sent a malformed path")
    for part in raw.split(b"/") if raw else []:
        check_name(part)
    return raw


def fatal_error(fatal: str, where: str = "") -> DeltavaultError:
    """The error for the agent's ``fatal``: NoSpace for a full disk, else TargetError."""
    kind, _, message = fatal.partition(": ")
    return (NoSpace if kind == "full" else TargetError)(f"{where}: {message}" if where else message)


class Agent:
    """``dest``, ``log`` and ``reporter``: in a pull the agent runs here, on DST's host, and
    reports the run itself (it then ignores the destination the sender names)."""

    def __init__(self, chan: Channel, *, dest: bytes | None = None, log: SyncLog | None = None,
                 reporter: Reporter | None = None) -> None:
        self.chan = chan
        self.dest, self.log = dest, log
        self.reporter = reporter or NullReporter()
        self.problems: list[SyncProblem] = []
        self.sender_problems: list[SyncProblem] = []
        self.sender_stopped = False
        self.finished = False
        self.refused: DeltavaultError | None = None  # why the run could not start here
        self.stats = SyncStats()
        self.records: list[list[Any]] = []
        self.fatal: str | None = None
        self.opts = SyncOptions()
        self.meta = MetaPolicy(self.opts)
        self.buffers = BufferPool(self.opts.bufsize)
        self.root = -1
        self.open: dict[bytes, int] = {}  # directories being synced, by path
        self.created: set[bytes] = set()  # directories this run made (nothing in them to compare)
        self.links: list[tuple[bytes, bytes]] = []
        self.link_dirs: set[bytes] = set()  # directories that get hard links at the end
        self.deferred: list[tuple[bytes, Entry]] = []  # their metadata, set after the links

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        try:
            if not self._hello():
                return
            while True:
                req = self.chan.recv()
                op = req.get("op") if isinstance(req, dict) else None
                if op == "finish":
                    self._finish(req)
                    return
                handler = {"dir": self._dir, "check": self._check, "put": self._put, "delta": self._delta,
                           "enddir": self._enddir}.get(op or "")
                if handler is None:
                    raise CorruptionError(f"the sender sent an unknown request {op!r}")
                handler(req)
        except EOFError:
            return  # the sender is gone; every file it finished is in place, no temp file is left
        finally:
            for fd in self.open.values():
                os.close(fd)
            if self.root >= 0:
                os.close(self.root)

    def _hello(self) -> bool:
        req = self.chan.recv()
        if not isinstance(req, dict) or req.get("op") != "hello" or req.get("version") != VERSION:
            self.chan.send({"error": f"this agent speaks protocol version {VERSION}; upgrade deltavault "
                            "on both hosts", "code": 2, "id": 0})
            return False
        try:
            self.opts = options_from(req["options"])
            self.meta = MetaPolicy(self.opts)
            self.buffers = BufferPool(self.opts.bufsize)
            self.filter = Filter(self.opts.excludes, self.opts.includes,
                                 default_excludes=self.opts.default_excludes)
            self.root = open_target_dir(self.dest or os.fsencode(req["dest"]), "destination")
        except DeltavaultError as exc:
            self.refused = exc
            self.chan.send({"error": exc.message, "code": int(exc.exit_code), "id": 0})
            return False
        self.open[b""] = os.dup(self.root)
        self.chan.send({"ok": True, "version": VERSION, "id": 0})
        return True

    def _reply(self, req: dict[str, Any], **kw: Any) -> None:
        self.chan.send({**kw, "id": req.get("id"), "records": self.records, "fatal": self.fatal})
        self.records = []

    # ------------------------------------------------------------------ outcomes
    def _done(self, action: str, rel: bytes, size: int = 0, written: int = 0, digest: bytes | None = None) -> None:
        self.records.append([action, rel, size, written, digest, None, None])
        if self.log is not None:
            self.log.write(action, size, rel, written=written, digest=digest)
        if action in ("new", "update", "delta"):
            self.reporter.advance(nbytes=size, items=1, current=display(rel))
        elif action not in ("delete", "mkdir"):
            self.reporter.advance(items=1)

    def _problem(self, rel: bytes, kind: str, message: str, size: int = 0) -> None:
        self.records.append(["error", rel, size, 0, None, kind, message])
        self.problems.append(SyncProblem(display(rel or b"."), kind, message))
        self.reporter.problem(display(rel or b"."), kind, message)
        if self.log is not None:
            self.log.write("error", size, rel or b".", error=f"{kind}: {message}")

    def _count(self, **kw: int) -> None:
        for k, v in kw.items():
            setattr(self.stats, k, getattr(self.stats, k) + v)

    def _os_problem(self, rel: bytes, exc: OSError) -> None:
        if exc.errno in NO_SPACE_ERRNOS or exc.errno == errno.EROFS:
            what = "full" if exc.errno in NO_SPACE_ERRNOS else "read-only"
            self._problem(rel, "write", "no space left on the destination" if what == "full"
                          else exc.strerror or str(exc))
            if self.fatal is None:
                self.fatal = f"{what}: the destination is {what} (while writing {display(rel)}); " \
                             "files already synced are complete"
        else:
            self._problem(rel, "write", exc.strerror or str(exc))

    def _meta_problems(self, rel: bytes, messages: list[str]) -> None:
        for m in messages:
            self._problem(rel or b".", "metadata", m)

    # ------------------------------------------------------------------ directories
    def _dir(self, req: dict[str, Any]) -> None:
        rel = _path(req["path"])
        want: list[list[Any]] = []
        if self.fatal is None:
            try:
                want = self._sync_dir(rel, [Entry(e) for e in req["entries"]],
                                      {check_name(n) for n in req["protected"]}, bool(req.get("included")))
            except OSError as exc:
                self._os_problem(rel or b".", exc)
        self._reply(req, want=want)

    def _sync_dir(self, rel: bytes, entries: list[Entry], protected: set[bytes],
                  included: bool) -> list[list[Any]]:
        if rel not in self.open:
            self.open[rel] = open_dir(self.root, rel)
        dfd = self.open[rel]
        fresh = rel in self.created
        if self.opts.delete and not fresh:
            self._delete_extras(dfd, rel, {e.name for e in entries} | protected, included)
        want: list[list[Any]] = []
        for e in entries:
            crel = join(rel, e.name)
            try:
                how = self._entry(dfd, rel, crel, e, fresh)
            except OSError as exc:
                self._os_problem(crel, exc)
                if self.fatal is not None:
                    return []
                continue
            if how is not None:
                want.append([e.name, how])
        return want

    def _delete_extras(self, dfd: int, rel: bytes, keep: set[bytes], included: bool) -> None:
        delete_extras(dfd, rel, lambda n, crel: n in keep or self.filter.protects(crel, n, included=included),
                      self._removed, self._problem)

    def _entry(self, dfd: int, rel: bytes, crel: bytes, e: Entry, fresh: bool) -> str | None:
        dst = None if fresh else lstat_at(dfd, e.name)
        if e.kind == "d":
            if dst is not None and not stat.S_ISDIR(dst.st_mode):
                os.unlink(e.name, dir_fd=dfd)
                dst = None
            if dst is None:
                os.mkdir(e.name, 0o700, dir_fd=dfd)
                self.created.add(crel)
                self._count(dirs_created=1)
                self._done("mkdir", crel)
            return None
        if dst is not None and stat.S_ISDIR(dst.st_mode):
            if not self._clear_dir(dfd, e.name, crel):
                return None
            dst = None
        if e.kind == "h":
            self.links.append((crel, _path(e.extra)))
            self.link_dirs.add(rel)
            return None
        if e.kind in ("l", "s"):
            self._special(dfd, crel, e)
            return None
        if dst is None or not stat.S_ISREG(dst.st_mode):
            return "whole"
        if dst.st_size == e.st.st_size:
            if self.opts.checksum or dst.st_mtime_ns != e.st.st_mtime_ns:
                return "check"
            self._same(dfd, crel, e, dst)
            return None
        return self._changed_how(dst, e)

    def _changed_how(self, dst: os.stat_result, e: Entry) -> str:
        small = min(dst.st_size, e.st.st_size) < self.opts.delta_min
        return "whole" if not self.opts.delta or small or max(dst.st_size, e.st.st_size) > DELTA_MAX else "delta"

    def _clear_dir(self, dfd: int, name: bytes, crel: bytes) -> bool:
        """A directory in DST stands where SRC has a file: only --delete removes it."""
        if not self.opts.delete:
            self._problem(crel, "write", "a directory is in the way in the destination (--delete replaces it)")
            return False
        remove_entry(dfd, name, crel, self._removed)
        return True

    def _removed(self, rel: bytes, st: os.stat_result) -> None:
        self._count(deleted=1)
        self._done("delete", rel, st.st_size if stat.S_ISREG(st.st_mode) else 0)

    def _special(self, dfd: int, crel: bytes, e: Entry) -> None:
        action, probs = place_special(dfd, e.name, e.st, e.extra or b"", e.xattrs if e.kind != "l" else None,
                                      self.meta, temp_name, lambda _t: None)
        self._meta_problems(crel, probs)
        self._count(**{_COUNTERS[action]: 1})
        self._done(action, crel)

    def _enddir(self, req: dict[str, Any]) -> None:
        rel = _path(req["path"])
        e = Entry(req["e"])
        fd = self.open.pop(rel, -1)
        if fd < 0 or self.fatal is not None:
            if fd >= 0:
                os.close(fd)
            return
        try:
            if self.opts.skip_empty_dirs and rel and rel in self.created and not os.listdir(fd):
                pdir, _, name = rel.rpartition(b"/")
                pfd = self.open.get(pdir, -1)
                if pfd >= 0:
                    os.rmdir(name, dir_fd=pfd)
                    self._count(dirs_created=-1)
                    return
            if rel in self.link_dirs:  # making the links would change its mtime
                self.deferred.append((rel, e))
                return
            self._dir_meta(fd, rel, e)
        except OSError as exc:
            self._os_problem(rel or b".", exc)
        finally:
            os.close(fd)

    def _dir_meta(self, fd: int, rel: bytes, e: Entry) -> None:
        self._meta_problems(rel, self.meta.apply_fd(fd, e.st, e.xattrs))

    # ------------------------------------------------------------------ regular files
    def _same(self, dfd: int, crel: bytes, e: Entry, dst: os.stat_result) -> None:
        """Content is equal; correct metadata that differs."""
        action, probs = fix_meta(dfd, e.name, e.st, dst, e.xattrs, self.meta)
        self._meta_problems(crel, probs)
        self._count(**{_COUNTERS[action]: 1})
        self._done(action, crel, e.st.st_size)

    def _check(self, req: dict[str, Any]) -> None:
        rel = _path(req["path"])
        want: list[list[Any]] = []
        dfd = self.open.get(rel, -1)
        for digest, raw_e in req["items"] if self.fatal is None and dfd >= 0 else []:
            e = Entry(raw_e)
            crel = join(rel, e.name)
            try:
                dst = os.stat(e.name, dir_fd=dfd, follow_symlinks=False)
                if self._digest_at(dfd, e.name) == digest:
                    self._same(dfd, crel, e, dst)
                else:
                    want.append([e.name, self._changed_how(dst, e)])
            except OSError as exc:
                self._os_problem(crel, exc)
        self._reply(req, want=want)

    def _digest_at(self, dfd: int, name: bytes) -> bytes:
        fd = os.open(name, _READ_FLAGS, dir_fd=dfd)
        try:
            return file_digest(fd, self.buffers.get(0))
        finally:
            os.close(fd)

    def _put(self, req: dict[str, Any]) -> None:
        rel = _path(req["path"])
        e = Entry(req["e"])
        crel = join(rel, e.name)
        dfd = self.open.get(rel, -1)
        tmp: bytes | None = None
        tfd = -1
        error: OSError | None = None
        if self.fatal is None and dfd >= 0:
            tmp = temp_name(e.name)
            try:
                tfd = os.open(tmp, _WRITE_FLAGS, 0o600, dir_fd=dfd)
            except OSError as exc:
                error, tmp = exc, None
        h = blake3.blake3(max_threads=1)
        off = written = 0
        try:
            while True:  # read every frame of this file, even when it can no longer be written
                frame = self.chan.recv()
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
                else:  # abort: the sender could not read it whole; it reports why
                    if tmp is not None:
                        unlink_quiet(dfd, tmp)
                    return
            if error is None and tfd >= 0 and tmp is not None:
                if off != e.st.st_size or h.digest() != frame["end"]:
                    raise CorruptionError(f"{display(crel)}: the data received does not match what was sent")
                if written < off:
                    os.ftruncate(tfd, off)
                action = "new" if lstat_at(dfd, e.name) is None else "update"
                self._install(dfd, tfd, tmp, crel, e, action, written, frame["end"])
                tmp = None
        except OSError as exc:
            error = exc
        finally:
            if tfd >= 0:
                os.close(tfd)
            if tmp is not None:
                unlink_quiet(dfd, tmp)
        if error is not None:
            self._os_problem(crel, error)

    def _install(self, dfd: int, tfd: int, tmp: bytes, crel: bytes, e: Entry, action: str, written: int,
                 digest: bytes) -> None:
        self._meta_problems(crel, self.meta.apply_fd(tfd, e.st, e.xattrs))
        if self.opts.verify:
            os.fsync(tfd)
            n, problem = verify_written(dfd, tmp, e.name, e.st.st_size, digest, self.opts.bufsize)
            self._count(bytes_verified=n, files_verified=1)
            if problem is not None:
                self._problem(crel, "verify", problem, e.st.st_size)
                return
        os.rename(tmp, e.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        if action == "delta":
            self._count(files_delta=1, delta_bytes_written=written, delta_file_bytes=e.st.st_size)
        elif action == "update":
            self._count(files_updated=1, bytes_copied=written)
        else:
            self._count(files_new=1, bytes_copied=written)
        self._done(action, crel, e.st.st_size, written, digest if self.opts.verify else None)

    def _delta(self, req: dict[str, Any]) -> None:
        """Rebuild the file from our old version and the chunks it lacks, fetched from the sender."""
        rel = _path(req["path"])
        e = Entry(req["e"])
        crel = join(rel, e.name)
        dfd = self.open.get(rel, -1)
        seed_fd = -1
        try:
            rebuilt = None
            try:
                if self.fatal is None and dfd >= 0:
                    seed_fd = os.open(e.name, _READ_FLAGS, dir_fd=dfd)
                    rebuilt = self._fetch(seed_fd, crel, e)
            except OSError as exc:
                self._os_problem(crel, exc)
            finally:
                self.chan.send({"op": "bye"})  # ends the sender's answering loop, whatever happened
            if rebuilt is not None:
                self._write_rebuilt(dfd, seed_fd, crel, e, rebuilt)
        finally:
            if seed_fd >= 0:
                os.close(seed_fd)

    def _fetch(self, seed_fd: int, crel: bytes, e: Entry) -> Rebuilt | None:
        def load() -> bytes:
            with open(seed_fd, "rb", closefd=False) as f:
                return f.read()

        # Same size: most likely changed in place (a database, a VM image), so compare whole
        # pages, and a change costs exactly its pages; else content-defined chunks.
        pages = os.fstat(seed_fd).st_size == e.st.st_size
        try:
            rebuilt = fetch_rebuilt(self.chan, crel, load, pages=pages)
        except Changed:
            return None  # the sender sends it again, or reports it
        except (SourceError, CorruptionError) as exc:
            self._problem(crel, "write", f"delta transfer failed: {exc.message}", e.st.st_size)
            return None
        self._count(delta_wire_bytes=rebuilt.stats.data_fetched)
        return rebuilt

    def _write_rebuilt(self, dfd: int, seed_fd: int, crel: bytes, e: Entry, rebuilt: Rebuilt) -> None:
        """Into a reflink clone of the old file, writing only the fetched chunks, when every
        reused chunk sits where it sat before; else the whole file. Zeros stay holes."""
        tmp = temp_name(e.name)
        tfd = -1
        try:
            tfd = os.open(tmp, _WRITE_FLAGS, 0o600, dir_fd=dfd)
            size = rebuilt.plan.size
            # (Pieces of zeros may come from anywhere in the seed: all have one digest.)
            in_place = all(s is None or s == o or d == rdc.zero_digest(n) for o, n, d, s in rebuilt.plan.pieces)
            if in_place and reflink(seed_fd, tfd):
                old = rebuilt.seed.stream
                written = 0
                for off, n, buf, from_seed in rebuilt.regions():
                    if buf is None and is_zero(old[off:off + n]):
                        continue  # zeros over zeros
                    if buf is None or not from_seed:
                        pwrite_all(tfd, buf if buf is not None else bytes(n), off)
                        written += n
                self._count(delta_reflinked=1)
            else:
                written = _write_regions(tfd, rebuilt.regions())
            if os.fstat(tfd).st_size != size:  # (XFS flushes a truncated file on close)
                os.ftruncate(tfd, size)
            self._install(dfd, tfd, tmp, crel, e, "delta", written, rebuilt.stats.digest)
            tmp = b""
        except OSError as exc:
            self._os_problem(crel, exc)
        finally:
            if tfd >= 0:
                os.close(tfd)
            if tmp:
                unlink_quiet(dfd, tmp)

    # ------------------------------------------------------------------ the end
    def _finish(self, req: dict[str, Any]) -> None:
        for path, kind, message in req.get("problems") or []:  # the sender's, for a pull's report
            if self.log is not None:
                self.log.write("error", 0, path.encode("utf-8", "surrogateescape"), error=f"{kind}: {message}")
        self.sender_problems = [SyncProblem(path, kind, message) for path, kind, message in req.get("problems") or []]
        self.sender_stopped = bool(req.get("stopped"))
        self.finished = True
        if self.fatal is None:
            self._make_links()
            for rel, e in self.deferred:
                try:
                    fd = open_dir(self.root, rel)
                    try:
                        self._dir_meta(fd, rel, e)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    self._os_problem(rel or b".", exc)
        self._reply(req, stats=asdict(self.stats))

    def _make_links(self) -> None:
        for crel, first in self.links:
            try:
                self._link(crel, first)
            except OSError as exc:
                self._os_problem(crel, exc)

    def _link(self, crel: bytes, first: bytes) -> None:
        action, size = hard_link(self.root, crel, first, temp_name, lambda _t: None,
                                 lambda fd, n: self._clear_dir(fd, n, crel))
        if action == "missing":
            self._problem(crel, "write", f"hard link to {display(first)}, which was not synced")
        elif action in ("same", "hardlink"):
            self._count(**{_COUNTERS[action]: 1})
            self._done(action, crel, size)


_COUNTERS = {"same": "files_same", "meta": "meta_fixed", "symlink": "symlinks", "special": "special",
             "hardlink": "hardlinks"}




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
