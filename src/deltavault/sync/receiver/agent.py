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

DST is written as the local engine writes it (sync/dest.py): every directory is reached by
fd from DST's root, one component at a time with O_NOFOLLOW, and checked to be the
directory this run made or met (dev, ino); ``_Dirs`` keeps at most MAX_OPEN_DIRS of them
open and opens the others again, checked, when a request names them. "hello" carries the
sender's SRC identity: on the same kernel (ssh to localhost), a DST that is SRC, lies in it
or contains it is refused (sync/guard.py).
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
from deltavault.fs.dirfd import (
    Identity,
    Replaced,
    created_dir,
    handle_at,
    identity,
    lstat_at,
    mount_id,
    open_dir_checked,
    open_dir_path,
    open_parent_checked,
    reopen,
)
from deltavault.fs.paths import check_name, display, open_target_dir
from deltavault.progress import NullReporter, Reporter
from deltavault.sync.data import BufferPool, file_digest, hash_zeros, is_zero
from deltavault.sync.filters import Filter
from deltavault.sync.guard import Guard, check_missing_dest, mount_root
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.entries import (
    delete_extras,
    detach,
    fix_meta,
    hard_link,
    link_failed,
    link_target,
    needs_copy,
    open_existing,
    place_special,
    unlink_quiet,
    verify_written,
)
from deltavault.sync.receiver.remove import MAX_OPEN_DIRS, join, remove_entry, temp_name
from deltavault.sync.remote import Changed, Channel, Rebuilt, fetch_rebuilt
from deltavault.sync.report import SyncLog, SyncProblem, SyncStats
from deltavault.sync.wire import GROUP, VERSION, Entry, options_from

DELTA_MAX = 2 << 30  # both versions are held in memory while a file is rebuilt by delta
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Paths:
    """Checks the paths the sender sends: each component one safe name. A path whose
    parent was checked costs one name (the paths of a tree 5,000 deep are long)."""

    def __init__(self) -> None:
        self._ok: set[bytes] = {b""}

    def __call__(self, raw: Any) -> bytes:
        if not isinstance(raw, bytes):
            raise CorruptionError("the sender sent a malformed path")
        if raw in self._ok:
            return raw
        parent, sep, name = raw.rpartition(b"/")
        if sep and not parent:
            check_name(parent)  # an empty first component ("/abs"): refused
        if parent not in self._ok:
            for part in parent.split(b"/"):
                check_name(part)
        check_name(name)
        self._ok.add(raw)
        return raw


def fatal_error(fatal: str, where: str = "") -> DeltavaultError:
    """The error for the agent's ``fatal``: NoSpace for a full disk, else TargetError."""
    kind, _, message = fatal.partition(": ")
    return (NoSpace if kind == "full" else TargetError)(f"{where}: {message}" if where else message)


class _Dirs:
    """DST's directories of this run: their identities, and fds for the most recently used
    (at most MAX_OPEN_DIRS). One not open is opened again from its nearest open ancestor,
    one level at a time, each checked to be the directory recorded (a directory swapped
    or moved meanwhile is refused: Replaced)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.ids: dict[bytes, Identity] = {b"": identity(os.fstat(root))}
        self.mounts: dict[bytes, int] = {b"": mount_id(root)}
        self._fds: dict[bytes, int] = {}  # in use order, oldest first

    def record(self, rel: bytes, fd: int, mnt: int) -> None:
        """A directory just made or met, and checked; ``fd`` is closed (``get`` opens it
        again when its listing comes)."""
        try:
            self.ids[rel] = identity(os.fstat(fd))
            self.mounts[rel] = mnt
        finally:
            os.close(fd)

    def known(self, rel: bytes) -> bool:
        return rel in self.ids

    def get(self, rel: bytes) -> int:
        """An fd of DST/rel, owned by the cache (valid until the next call)."""
        fd = self._fds.pop(rel, -1)
        if fd < 0:
            fd = self._open(rel)
        self._keep(rel, fd)
        return fd

    def climb(self, rel: bytes) -> None:
        """Before DST/rel is forgotten: open its parent through "..", checked, if it is not
        open (a deep tree is left one level at a time)."""
        parent = rel.rpartition(b"/")[0]
        if rel and parent not in self._fds and rel in self._fds and parent in self.ids:
            fd = open_parent_checked(self._fds[rel], self.ids[parent])
            if fd is not None:
                self._keep(parent, fd)

    def forget(self, rel: bytes) -> None:
        fd = self._fds.pop(rel, -1)
        if fd >= 0:
            os.close(fd)

    def _open(self, rel: bytes) -> int:
        if rel not in self.ids:
            raise Replaced("not a directory of this run")
        parts = rel.split(b"/") if rel else []
        k = len(parts)
        while k and b"/".join(parts[:k]) not in self._fds:
            k -= 1
        base = b"/".join(parts[:k])
        fd = os.dup(self._fds[base] if k else self.root)
        try:
            for i in range(k, len(parts)):
                nfd = open_dir_checked(fd, parts[i], self.ids[b"/".join(parts[:i + 1])])
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _keep(self, rel: bytes, fd: int) -> None:
        old = self._fds.pop(rel, -1)
        if old >= 0 and old != fd:
            os.close(old)
        self._fds[rel] = fd
        while len(self._fds) > MAX_OPEN_DIRS:
            oldest = next(iter(self._fds))
            os.close(self._fds.pop(oldest))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


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
        self._path = _Paths()
        self.records: list[list[Any]] = []
        self.fatal: str | None = None
        self.opts = SyncOptions()
        self.meta = MetaPolicy(self.opts)
        self.buffers = BufferPool(self.opts.bufsize)
        self.root = -1
        self.dirs: _Dirs | None = None  # DST's directories of this run
        self.guard: Guard | None = None
        self.created: set[bytes] = set()  # directories this run made (nothing in them to compare)
        self.links: list[tuple[bytes, bytes]] = []
        self.link_dirs: set[bytes] = set()  # directories that get hard links at the end
        self.deferred: list[tuple[bytes, Entry, Identity]] = []  # their metadata, set after the links
        # Hard-link groups' files by path: identity, and installed by this run (else kept).
        self.targets: dict[bytes, tuple[Identity, bool]] = {}

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
            if self.dirs is not None:
                self.dirs.close()
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
            self._open_root(self.dest or os.fsencode(req["dest"]), req.get("source"))
        except DeltavaultError as exc:
            self.refused = exc
            self.chan.send({"error": exc.message, "code": int(exc.exit_code), "id": 0})
            return False
        assert self.guard is not None
        self.chan.send({"ok": True, "version": VERSION, "id": 0, "dest": self.guard.describe(is_src=False)})
        return True

    def _open_root(self, dest: bytes, source: Any) -> None:
        """Open (or make) DST, refused if the sender's SRC is on this kernel and overlaps it."""
        src_name = os.fsencode(source["path"]) if isinstance(source, dict) and isinstance(
            source.get("path"), bytes | str) else b"the source"
        try:
            self.root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            check_missing_dest(Guard.peer_root(source), dest, src_name)
        except OSError:
            pass
        if self.root < 0:
            self.root = open_target_dir(dest, "destination")
        self.guard = Guard.one_side(self.root, is_src=False, peer=source)
        self.guard.check(src_name, dest)
        self.dirs = _Dirs(self.root)

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
        rel = self._path(req["path"])
        want: list[list[Any]] = []
        assert self.dirs is not None
        if self.fatal is None and self.dirs.known(rel):  # (else not made: reported already)
            try:
                want = self._sync_dir(rel, [Entry(e) for e in req["entries"]],
                                      {check_name(n) for n in req["protected"]}, bool(req.get("included")))
            except OSError as exc:
                self._os_problem(rel or b".", exc)
        self._reply(req, want=want)

    def _sync_dir(self, rel: bytes, entries: list[Entry], protected: set[bytes],
                  included: bool) -> list[list[Any]]:
        assert self.dirs is not None
        dfd = self.dirs.get(rel)
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
            self._subdir(dfd, rel, crel, e, dst)
            return None
        if dst is not None and stat.S_ISDIR(dst.st_mode):
            if not self._clear_dir(dfd, e.name, crel):
                return None
            dst = None
        if e.kind == "h":
            self.links.append((crel, self._path(e.extra)))
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
            return self._same(dfd, crel, e, dst)
        return self._changed_how(dst, e)

    def _subdir(self, dfd: int, rel: bytes, crel: bytes, e: Entry, dst: os.stat_result | None) -> None:
        """Make or open DST/crel, checked: the directory we made, or the one met; not a
        mount showing SRC or DST (left alone, reported)."""
        assert self.dirs is not None and self.guard is not None
        if dst is not None and not stat.S_ISDIR(dst.st_mode):
            os.unlink(e.name, dir_fd=dfd)
            dst = None
        mnt = self.dirs.mounts[rel]
        if dst is None:
            os.mkdir(e.name, 0o700, dir_fd=dfd)
            fd, _ = created_dir(dfd, e.name)
            self.created.add(crel)
            self._count(dirs_created=1)
            self._done("mkdir", crel)
        else:
            fd = open_dir_checked(dfd, e.name, identity(dst))
            try:
                is_root, mnt = mount_root(fd, mnt)
                why = self.guard.overlap(fd) if is_root else None
            except BaseException:
                os.close(fd)
                raise
            if why is not None:
                os.close(fd)
                self._problem(crel, "write", f"left alone: {why} (a mount inside the destination)")
                return
        self.dirs.record(crel, fd, mnt)

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
        rel = self._path(req["path"])
        e = Entry(req["e"])
        assert self.dirs is not None
        if self.fatal is not None or not self.dirs.known(rel):
            return
        try:
            fd = self.dirs.get(rel)
            if self.opts.skip_empty_dirs and rel and rel in self.created and not os.listdir(fd):
                pdir, _, name = rel.rpartition(b"/")
                self.dirs.forget(rel)
                os.rmdir(name, dir_fd=self.dirs.get(pdir))
                self._count(dirs_created=-1)
                return
            if rel in self.link_dirs:  # making the links would change its mtime
                self.deferred.append((rel, e, self.dirs.ids[rel]))
                return
            self._dir_meta(fd, rel, e)
        except OSError as exc:
            self._os_problem(rel or b".", exc)
        finally:
            self.dirs.climb(rel)
            self.dirs.forget(rel)

    def _dir_meta(self, fd: int, rel: bytes, e: Entry) -> None:
        self._meta_problems(rel, self.meta.apply_fd(fd, e.st, e.xattrs))

    def _dir_fd(self, rel: bytes) -> int:
        """The fd of DST/rel for a file request; -1 when it cannot be written (reported)."""
        assert self.dirs is not None
        if self.fatal is not None or not self.dirs.known(rel):
            return -1
        try:
            return self.dirs.get(rel)
        except OSError as exc:
            self._os_problem(rel or b".", exc)
            return -1

    # ------------------------------------------------------------------ regular files
    def _same(self, dfd: int, crel: bytes, e: Entry, dst: os.stat_result) -> str | None:
        """Content is equal; correct metadata that differs. "whole": it must be sent anew
        (its metadata differs, and it has other links, maybe to a file outside DST)."""
        action, probs, ident = fix_meta(dfd, e.name, e.st, dst, e.xattrs, self.meta)
        if action == "replace":
            return "whole"
        if e.extra == GROUP:
            self.targets[crel] = (ident, False)
        self._meta_problems(crel, probs)
        self._count(**{_COUNTERS[action]: 1})
        self._done(action, crel, e.st.st_size)
        return None

    def _check(self, req: dict[str, Any]) -> None:
        rel = self._path(req["path"])
        want: list[list[Any]] = []
        dfd = self._dir_fd(rel) if req["items"] else -1
        for digest, raw_e in req["items"] if dfd >= 0 else []:
            e = Entry(raw_e)
            crel = join(rel, e.name)
            try:
                dst = os.stat(e.name, dir_fd=dfd, follow_symlinks=False)
                if self._digest_at(dfd, e.name, dst) == digest:
                    how = self._same(dfd, crel, e, dst)
                    if how is not None:
                        want.append([e.name, how])
                else:
                    want.append([e.name, self._changed_how(dst, e)])
            except OSError as exc:
                self._os_problem(crel, exc)
        self._reply(req, want=want)

    def _digest_at(self, dfd: int, name: bytes, dst: os.stat_result) -> bytes:
        fd = open_existing(dfd, name, dst, os.O_RDONLY)
        try:
            return file_digest(fd, self.buffers.get(0))
        finally:
            os.close(fd)

    def _put(self, req: dict[str, Any]) -> None:
        rel = self._path(req["path"])
        e = Entry(req["e"])
        crel = join(rel, e.name)
        dfd = self._dir_fd(rel)
        tmp: bytes | None = None
        tfd = -1
        error: OSError | None = None
        if dfd >= 0:
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
        ident = identity(os.fstat(tfd))
        if self.opts.verify:
            os.fsync(tfd)
            n, problem = verify_written(dfd, tmp, e.name, ident, e.st.st_size, digest, self.opts.bufsize)
            self._count(bytes_verified=n, files_verified=1)
            if problem is not None:
                self._problem(crel, "verify", problem, e.st.st_size)
                return
        os.rename(tmp, e.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        if e.extra == GROUP:
            self.targets[crel] = (ident, True)
        if action == "delta":
            self._count(files_delta=1, delta_bytes_written=written, delta_file_bytes=e.st.st_size)
        elif action == "update":
            self._count(files_updated=1, bytes_copied=written)
        else:
            self._count(files_new=1, bytes_copied=written)
        self._done(action, crel, e.st.st_size, written, digest if self.opts.verify else None)

    def _delta(self, req: dict[str, Any]) -> None:
        """Rebuild the file from our old version and the chunks it lacks, fetched from the sender."""
        rel = self._path(req["path"])
        e = Entry(req["e"])
        crel = join(rel, e.name)
        dfd = self._dir_fd(rel)
        seed_fd = -1
        try:
            rebuilt = None
            try:
                if dfd >= 0:
                    seed_fd = _open_seed(dfd, e.name)
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
            for rel, e, ident in self.deferred:
                self._deferred_meta(rel, e, ident)
        self._reply(req, stats=asdict(self.stats))

    def _deferred_meta(self, rel: bytes, e: Entry, ident: Identity) -> None:
        assert self.dirs is not None
        try:
            fd = self.dirs.get(rel)  # reopened from DST's root, each level checked
            if identity(os.fstat(fd)) != ident:
                raise Replaced("another directory stands here")
            self._dir_meta(fd, rel, e)
        except OSError as exc:
            self._os_problem(rel or b".", exc)
        finally:
            self.dirs.forget(rel)

    def _make_links(self) -> None:
        """Each group's names linked to the file installed or kept for it, through a handle
        checked to be that file (sync/dest.py)."""
        groups: dict[bytes, list[bytes]] = {}
        for crel, first in self.links:
            groups.setdefault(first, []).append(crel)
        for first, rels in groups.items():
            try:
                h, hst = self._link_source(first, rels)
            except OSError as exc:
                for crel in rels:
                    self._problem(crel, "write", link_failed(first, exc))
                continue
            try:
                for crel in rels:
                    try:
                        self._link(crel, h, hst)
                    except OSError as exc:
                        self._os_problem(crel, exc)
            finally:
                os.close(h)

    def _link_source(self, first: bytes, rels: list[bytes]) -> tuple[int, os.stat_result]:
        """The file to link a group's names to: the one installed or kept for it. An older
        sender does not mark groups: then the file under the first name, if it is one."""
        ident, installed = self.targets.get(first, (None, False))
        if ident is None:
            h, hst = _regular_at(self.root, first)
        else:
            h, hst = link_target(self.root, first, ident)
        if installed or not needs_copy(self.root, first, rels, hst):
            return h, hst
        try:
            return detach(self.root, first, h, temp_name, lambda _t: None, self.buffers)
        finally:
            os.close(h)

    def _link(self, crel: bytes, h: int, hst: os.stat_result) -> None:
        action = hard_link(self.root, crel, h, hst, temp_name, lambda _t: None,
                           lambda fd, n: self._clear_dir(fd, n, crel))
        if action in ("same", "hardlink"):
            self._count(**{_COUNTERS[action]: 1})
            self._done(action, crel, hst.st_size)


def _open_seed(dfd: int, name: bytes) -> int:
    """The old version of a file, for a delta: opened through a handle checked to be a
    regular file (a FIFO or device swapped in is never opened)."""
    h, st = handle_at(dfd, name)
    try:
        if not stat.S_ISREG(st.st_mode):
            raise Replaced("not a regular file")
        return reopen(h, os.O_RDONLY)
    finally:
        os.close(h)


def _regular_at(root: int, rel: bytes) -> tuple[int, os.stat_result]:
    pdir, _, name = rel.rpartition(b"/")
    pfd = open_dir_path(root, pdir)
    try:
        h, st = handle_at(pfd, name)
    finally:
        os.close(pfd)
    if not stat.S_ISREG(st.st_mode):
        os.close(h)
        raise FileNotFoundError(errno.ENOENT, "not a regular file")
    return h, st


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
