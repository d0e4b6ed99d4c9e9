"""The sending side of a sync between hosts: walks SRC and reads files, while the agent
(sync/agent.py, which has the protocol) compares, writes and deletes. In a push this runs
here and reaches the agent through ssh; in a pull it runs on the source host as
``deltavault sync-source``, with the agent at the other end of its stdin and stdout
(sync/pull.py). A changed file that the destination already has in an older version travels
by remote delta (RDC-style recursive signatures, sync/remote.py): only the chunks the old
version lacks cross the network.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3

from deltavault.errors import NoSpace, SourceError, TargetError, UsageError
from deltavault.fs.clone import pread_full
from deltavault.fs.dirfd import Identity, identity, mount_id, open_dir_at, open_parent_checked
from deltavault.fs.paths import display, proc_path
from deltavault.fs.sparse import data_extents, is_sparse
from deltavault.progress import NullReporter, Reporter
from deltavault.sync.data import (
    BufferPool,
    SourceReadError,
    file_digest,
    hash_zeros,
    is_zero,
    read_source,
)
from deltavault.sync.filters import Filter
from deltavault.sync.guard import Guard, mount_root
from deltavault.sync.local.engine import SyncResult
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.agent import fatal_error
from deltavault.sync.receiver.entries import OpenFailed, changed_since, open_source
from deltavault.sync.receiver.remove import MAX_OPEN_DIRS, join
from deltavault.sync.remote import Channel, serve
from deltavault.sync.report import SyncLog, SyncProblem, SyncStats
from deltavault.sync.ssh import DEFAULT_REMOTE, RemotePath, SshProcess
from deltavault.sync.wire import GROUP, VERSION, entry, kind_of, options_wire


class _Lost(Exception):
    """The connection to the agent ended."""


class _Stop(Exception):
    """The agent's destination is full or read-only, or --stop-on-error."""


BATCH_DIRS = 64  # directories listed per round trip
BATCH_ENTRIES = 4096
# Listings hold their directory open until its files are sent (three batches are in
# flight); a batch ends once this many hold one, so that with the walk's own MAX_OPEN_DIRS
# the sender stays under a 256-file limit at any depth.
BATCH_FDS = 32


@dataclass
class _Listing:
    fd: int  # the directory, open until its files have been sent (-1: it has none)
    rel: bytes
    st: os.stat_result
    included: bool
    xattrs: list[tuple[bytes, bytes]] | None = None  # the directory's own, sent at its end
    entries: list[list[Any]] = field(default_factory=list)
    protected: list[bytes] = field(default_factory=list)
    files: dict[bytes, os.stat_result] = field(default_factory=dict)
    subdirs: list[tuple[bytes, bytes, bool, Identity]] = field(default_factory=list)
    want: list[tuple[bytes, str]] = field(default_factory=list)
    rid: int = 0  # the request whose reply is awaited (its listing's, then its check's)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(eq=False)
class _Frame:
    """A directory the walk is in: its own fd (to open subdirectories), closed for now (-1)
    when deeper than MAX_OPEN_DIRS."""

    fd: int
    ident: Identity
    mnt: int
    listing: _Listing
    next: int = 0  # the next subdirectory


@dataclass
class _End:
    listing: _Listing


class Duplex:
    """The agent channel, read by a thread of its own. Replies are taken off the wire as they
    come, so the agent never waits to write while this side is writing (however many requests
    are in flight, the pipes cannot fill both ways). Replies are matched to requests by id;
    the agent's own requests (during a delta) go to ``recv``."""

    def __init__(self, chan: Channel) -> None:
        self._chan = chan
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._replies: dict[int, Any] = {}
        self._failed: BaseException | None = None
        self._cond = threading.Condition()
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, name="dv-push-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                msg = self._chan.recv()
            except BaseException as exc:  # EOF, a broken frame: handed to whoever waits
                with self._cond:
                    self._failed = exc
                    self._cond.notify_all()
                self._requests.put(_Failed(exc))
                return
            if isinstance(msg, dict) and "op" in msg:
                self._requests.put(msg)
            else:
                rid = msg.get("id") if isinstance(msg, dict) else None
                with self._cond:
                    self._replies[rid if isinstance(rid, int) else -1] = msg
                    self._cond.notify_all()

    @property
    def sent(self) -> int:
        return self._chan.sent

    @property
    def received(self) -> int:
        return self._chan.received

    def send(self, obj: Any) -> None:
        self._chan.send(obj)

    def request(self, obj: dict[str, Any]) -> int:
        """Send a request that has a reply; returns the id to wait for."""
        self._next_id += 1
        self._chan.send({**obj, "id": self._next_id})
        return self._next_id

    def reply(self, rid: int) -> Any:
        with self._cond:
            while rid not in self._replies:
                if self._failed is not None:
                    raise self._failed
                self._cond.wait()
            return self._replies.pop(rid)

    def recv(self) -> Any:
        msg = self._requests.get()
        if isinstance(msg, _Failed):
            self._requests.put(msg)  # and to every later reader
            raise msg.exc
        return msg


@dataclass
class _Failed:
    exc: BaseException


class Transport(Protocol):
    """How the agent is reached: ssh (SshProcess), or this process's stdin and stdout when
    the agent started us (a pull)."""

    channel: Channel

    def failure(self, what: str) -> Exception: ...

    def close(self) -> None: ...


class PushSyncer:
    def __init__(self, src: str | bytes, where: RemotePath, options: SyncOptions,
                 reporter: Reporter | None = None, log: SyncLog | None = None, *,
                 rsh: str = "ssh", remote: str = DEFAULT_REMOTE, transport: Transport | None = None) -> None:
        self.src = os.fsencode(src)
        self.where = where
        self.opts = options
        self.reporter = reporter or NullReporter()
        self.log = log
        self.rsh, self.remote, self.transport = rsh, remote, transport
        self.stats = SyncStats()
        self.problems: list[SyncProblem] = []
        self.filter = Filter(options.excludes, options.includes, default_excludes=options.default_excludes)
        self.meta = MetaPolicy(options)
        self.buffers = BufferPool(max(4096, options.bufsize))
        self.sent = self.received = 0  # bytes on the wire, both ways
        self._first_link: dict[tuple[int, int], bytes] = {}
        self._fatal: str | None = None
        self._stopped = False
        self._guard: Guard | None = None
        self._entered: set[Identity] = set()  # source directories entered: none twice

    @property
    def stopped(self) -> bool:
        return self._stopped

    def partial(self) -> SyncResult:
        return SyncResult(self.stats, self.problems, self._stopped, wire=(self.sent, self.received))

    def run(self) -> SyncResult:
        try:
            root = os.open(self.src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot open the source {display(self.src)}: {exc.strerror or exc}") from exc
        proc = self.transport or SshProcess(self.where, f"{self.remote} sync-agent", rsh=self.rsh)
        self.chan = Duplex(proc.channel)
        self.reporter.start("sync")
        try:
            self._hello(root)
            tree = self._tree(root, not self.filter.has_includes)
            try:
                self._walk(tree)
            except _Stop:
                pass
            finally:
                tree.close()  # closes the directories it still holds
            self._finish()
        except _Lost:
            raise proc.failure("closed the connection") from None
        finally:
            os.close(root)
            self.sent, self.received = self.chan.sent, self.chan.received
            proc.close()
            self.reporter.finish()
        if self._fatal is not None:
            raise fatal_error(self._fatal, str(self.where))
        return self.partial()

    # ------------------------------------------------------------------ wire
    def _send(self, obj: Any) -> None:
        try:
            self.chan.send(obj)
        except (BrokenPipeError, ConnectionError) as exc:
            raise _Lost from exc

    def _request(self, obj: dict[str, Any]) -> int:
        try:
            return self.chan.request(obj)
        except (BrokenPipeError, ConnectionError) as exc:
            raise _Lost from exc

    def _reply(self, rid: int, *, stop: bool = True) -> dict[str, Any]:
        """The reply to a request, its outcomes taken in; _Stop (unless ``stop`` is False)
        when the agent's disk cannot take more or --stop-on-error has stopped the run."""
        try:
            rep: dict[str, Any] = self.chan.reply(rid)
        except (EOFError, ConnectionError) as exc:
            raise _Lost from exc
        self._absorb(rep)
        if rep.get("fatal") and self._fatal is None:
            self._fatal = rep["fatal"]
        if stop and (self._fatal is not None or self._stopped):
            raise _Stop
        return rep

    def _hello(self, root: int) -> None:
        """Options, and SRC's identity: an agent on this same kernel refuses a DST that
        overlaps it, and tells us DST's, so that the walk leaves alone a mount showing it."""
        options = {**options_wire(self.opts), "bufsize": self.buffers.size}
        source = {**Guard.one_side(root, is_src=True).describe(is_src=True), "path": self.src}
        try:
            self.chan.send({"op": "hello", "version": VERSION, "dest": self.where.path, "options": options,
                            "source": source})
        except (BrokenPipeError, ConnectionError) as exc:
            raise _Lost from exc
        rep = self._reply(0)
        if "error" in rep:
            code = rep.get("code")
            raise (UsageError if code == 2 else NoSpace if code == 14 else TargetError)(
                f"{self.where}: {rep['error']}")
        self._guard = Guard.one_side(root, is_src=True, peer=rep.get("dest"))

    def _absorb(self, rep: dict[str, Any]) -> None:
        """The agent's outcomes: problems, and lines for the log."""
        for action, rel, size, written, digest, kind, message in rep.get("records", []):
            if action == "error":
                self._problem(rel, kind, message, size=size)
            elif self.log is not None:
                self.log.write(action, size, rel, written=written, digest=digest)

    def _finish(self) -> None:
        # The problems found here go too: in a pull, the agent's side reports the run.
        rid = self._request({"op": "finish", "problems": [[p.path, p.kind, p.message] for p in self.problems],
                             "stopped": self._stopped})
        self.stats.add(SyncStats(**self._reply(rid, stop=False)["stats"]))

    # ------------------------------------------------------------------ outcomes
    def _problem(self, rel: bytes, kind: str, message: str, *, size: int = 0) -> None:
        p = SyncProblem(display(rel or b"."), kind, message)
        self.problems.append(p)
        self.reporter.problem(p.path, kind, message)
        if self.log is not None:
            self.log.write("error", size, rel or b".", error=f"{kind}: {message}")
        if self.opts.stop_on_error and kind != "skipped":
            self._stopped = True

    # ------------------------------------------------------------------ walking
    def _tree(self, root: int, included: bool) -> Generator[_Listing | _End, None, None]:
        """Directories in depth-first order, each as its listing and, after everything
        below it, its end. Iterative (an explicit stack of frames), with at most
        MAX_OPEN_DIRS of the walk's own directory fds open: deeper, the shallowest are
        closed and opened again through ".." (checked) when the walk climbs back."""
        st = os.fstat(root)
        top = self._list(os.dup(root), b"", st, included)
        if top is None:
            return
        yield top
        stack = [_Frame(os.dup(root), identity(st), -1, top)]
        closed_below = 1  # stack[1:closed_below] have their fd closed
        try:
            stack[0].mnt = mount_id(root)
            while stack:
                f = stack[-1]
                if f.fd >= 0 and f.next < len(f.listing.subdirs):
                    name, crel, inc, ident = f.listing.subdirs[f.next]
                    f.next += 1
                    child = self._enter(f, name, crel, inc, ident)
                    if child is None:
                        continue
                    if isinstance(child, _End):
                        yield child
                        continue
                    yield child.listing
                    stack.append(child)
                    while len(stack) - closed_below > MAX_OPEN_DIRS:
                        os.close(stack[closed_below].fd)
                        stack[closed_below].fd = -1
                        closed_below += 1
                    continue
                stack.pop()
                if stack and stack[-1].fd < 0:
                    up = open_parent_checked(f.fd, stack[-1].ident)
                    if up is None:  # moved meanwhile: the rest of it is not sent (so not deleted)
                        self._problem(stack[-1].listing.rel, "changed", "moved during the run; its "
                                      "remaining subdirectories were not synced")
                        stack[-1].next = len(stack[-1].listing.subdirs)
                    else:
                        stack[-1].fd = up
                    closed_below = len(stack) - 1
                os.close(f.fd)
                f.fd = -1
                yield _End(f.listing)
        finally:
            for f in stack:
                f.listing.close()
                if f.fd >= 0:
                    os.close(f.fd)

    def _enter(self, parent: _Frame, name: bytes, crel: bytes, included: bool,
               listed: Identity) -> _Frame | _End | None:
        """A subdirectory opened, checked and listed; or its end alone when it must not be
        walked (already entered, or a mount showing SRC or DST: reported "skipped");
        None when it cannot be read (reported: the agent deletes nothing there)."""
        try:
            fd = open_dir_at(parent.fd, name)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                self._problem(crel, "changed", "replaced by a non-directory while being read; not followed")
            else:
                self._problem(crel, "unreadable", f"directory cannot be opened: {exc.strerror}")
            return None
        try:
            st = os.fstat(fd)
            if identity(st) != listed:
                self._problem(crel, "changed", "replaced by another directory while being read; not synced")
                return None
            is_root, mnt = mount_root(fd, parent.mnt)
            why = None
            overlap = self._guard.overlap(fd) if is_root and self._guard is not None else None
            if overlap is not None:
                why = f"{overlap}: not synced into itself; kept empty there"
            elif identity(st) in self._entered:
                why = "a directory already synced at another path in this run (a bind mount): kept empty there"
            self._entered.add(identity(st))
            if why is not None:
                self._problem(crel, "skipped", why)
                return _End(_Listing(-1, crel, st, included, self._xattrs(fd, crel)))  # only its end
            listing = self._list(os.dup(fd), crel, st, included)
            if listing is None:
                return None
            out = _Frame(fd, identity(st), mnt, listing)
            fd = -1
            return out
        finally:
            if fd >= 0:
                os.close(fd)

    def _xattrs(self, fd: int, rel: bytes) -> list[tuple[bytes, bytes]] | None:
        try:
            return self.meta.source_xattrs(fd=fd)
        except OSError as exc:
            self._problem(rel, "metadata", f"extended attributes unreadable: {exc.strerror}")
            return None

    def _list(self, fd: int, rel: bytes, st_dir: os.stat_result, included: bool) -> _Listing | None:
        """Takes ``fd``: the listing keeps it while it has files to send."""
        try:
            with os.scandir(fd) as it:
                names = sorted((os.fsencode(e.name), e) for e in it)
        except OSError as exc:
            # No listing goes out, so the agent deletes nothing under here.
            os.close(fd)
            self._problem(rel, "unreadable", f"directory cannot be listed: {exc.strerror}")
            return None
        d = _Listing(fd, rel, st_dir, included, self._xattrs(fd, rel))
        if not rel:
            self._entered.add(identity(st_dir))
        for name, de in names:
            crel = join(rel, name)
            if self.filter.excluded(crel, name):
                d.protected.append(name)
                continue
            try:
                st = de.stat(follow_symlinks=False)
                inc = included or self.filter.included(crel, name)
                kind = kind_of(st)
                if kind is None or (not inc and kind != "d"):
                    d.protected.append(name)
                    if kind is None and self.log is not None:
                        self.log.write("skip", 0, crel, error="socket or unknown type: not copied")
                    continue
                extra: bytes | None = None
                if kind == "l":
                    extra = os.readlink(name, dir_fd=fd)
                elif kind == "f" and st.st_nlink > 1:
                    first = self._first_link.setdefault((st.st_dev, st.st_ino), crel)
                    kind, extra = ("h", first) if first != crel else ("f", GROUP)
                xattrs = self.meta.source_xattrs(path=proc_path(fd, name)) if kind not in ("l", "h") else None
            except FileNotFoundError:
                self._problem(crel, "vanished", "disappeared before it could be read")
                continue
            except OSError as exc:
                d.protected.append(name)
                self._problem(crel, "unreadable", exc.strerror or str(exc))
                continue
            d.entries.append(entry(name, kind, st, extra=extra, xattrs=xattrs))
            if kind == "d":
                d.subdirs.append((name, crel, inc, identity(st)))
            elif kind == "f":
                d.files[name] = st
            else:
                self.reporter.advance(items=1)
        if not d.files:
            d.close()  # nothing will be read from it
        return d

    def _walk(self, tree: Iterator[_Listing | _End]) -> None:
        """Three batches in flight, each a stage ahead of the next: while the files of one
        are sent, the agent compares the digests asked of the next and lists the one after.
        So the agent always has work, and round trips cost no idle time."""
        listed = self._list_batch(tree)
        checked: deque[list[_Listing | _End]] = deque()
        try:
            while listed or checked:
                ahead = self._list_batch(tree) if listed else []
                if listed:
                    self._ask_checks(listed)
                    checked.append(listed)
                listed = ahead
                if len(checked) > 1 or not listed:
                    self._send_batch(checked.popleft())
        finally:
            for batch in (listed, *checked):
                for ev in batch:
                    (ev.listing if isinstance(ev, _End) else ev).close()

    def _list_batch(self, tree: Iterator[_Listing | _End]) -> list[_Listing | _End]:
        """Send the listings of up to BATCH_DIRS directories (or BATCH_ENTRIES entries, or
        BATCH_FDS directories held open for their files)."""
        batch: list[_Listing | _End] = []
        dirs = entries = fds = 0
        for ev in tree:
            if isinstance(ev, _Listing):
                ev.rid = self._request({"op": "dir", "path": ev.rel, "entries": ev.entries,
                                        "protected": ev.protected, "included": ev.included})
                dirs += 1
                entries += len(ev.entries)
                fds += ev.fd >= 0
            batch.append(ev)
            if dirs >= BATCH_DIRS or entries >= BATCH_ENTRIES or fds >= BATCH_FDS:
                break
        return batch

    def _ask_checks(self, batch: list[_Listing | _End]) -> None:
        """Take the agent's wants for a listed batch; send digests of the files it asks about."""
        for ev in batch:
            if isinstance(ev, _Listing):
                ev.want = [(n, how) for n, how in self._reply(ev.rid)["want"]]
                checks = [n for n, how in ev.want if how == "check"]
                ev.rid = 0
                if checks:
                    items = [got for got in (self._digest(ev.fd, n, join(ev.rel, n)) for n in checks) if got is not None]
                    ev.rid = self._request({"op": "check", "path": ev.rel, "items": items})

    def _send_batch(self, batch: list[_Listing | _End]) -> None:
        try:
            for ev in batch:
                if isinstance(ev, _Listing):
                    if ev.rid:
                        ev.want = [w for w in ev.want if w[1] != "check"] + [
                            (n, how) for n, how in self._reply(ev.rid)["want"]]
                    self._send_files(ev)
                    ev.close()  # its files are sent
                else:
                    self._end(ev.listing)
        finally:
            for ev in batch:
                (ev.listing if isinstance(ev, _End) else ev).close()

    def _send_files(self, d: _Listing) -> None:
        sent = {n for n, _ in d.want}
        self.reporter.advance(items=sum(1 for n in d.files if n not in sent))
        for name, how in d.want:
            self._send_file(d.fd, d.rel, name, d.files[name], how)
            if self._stopped:
                raise _Stop

    def _end(self, d: _Listing) -> None:
        self._send({"op": "enddir", "path": d.rel,
                    "e": entry(d.rel.rpartition(b"/")[2] or b"_", "d", d.st, xattrs=d.xattrs)})

    # ------------------------------------------------------------------ files
    def _open(self, dfd: int, name: bytes, rel: bytes) -> int | None:
        try:
            return open_source(dfd, name)
        except OpenFailed as exc:
            self._problem(rel, exc.kind, str(exc))
            return None

    def _digest(self, dfd: int, name: bytes, rel: bytes) -> list[Any] | None:
        """[BLAKE3, entry] of a file whose size matches the destination's (--checksum, or
        another mtime): the agent keeps its copy when the content is the same."""
        fd = self._open(dfd, name, rel)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            digest = file_digest(fd, self.buffers.get(0), read_source)
            xattrs = self.meta.source_xattrs(fd=fd)
        except (SourceReadError, OSError) as exc:
            self._problem(rel, "unreadable", str(exc))
            return None
        finally:
            os.close(fd)
        return [digest, entry(name, "f", st, xattrs=xattrs)]

    def _send_file(self, dfd: int, rel: bytes, name: bytes, listed: os.stat_result, how: str) -> None:
        crel = join(rel, name)
        for _attempt in range(self.opts.attempts):
            fd = self._open(dfd, name, crel)
            if fd is None:
                return
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    self._problem(crel, "changed", "no longer a regular file")
                    return
                xattrs = self.meta.source_xattrs(fd=fd)
                e = entry(name, "f", st, xattrs=xattrs)
                sent = self._delta(fd, st, rel, e) if how == "delta" else self._put(fd, st, rel, e)
            except (SourceReadError, OSError) as exc:
                self._problem(crel, "unreadable", str(exc) if isinstance(exc, SourceReadError)
                              else exc.strerror or str(exc), size=listed.st_size)
                return
            finally:
                os.close(fd)
            if sent:
                self.reporter.advance(nbytes=st.st_size, items=1, current=display(crel))
                return
        self._problem(crel, "changed", f"changed while being copied, {self.opts.attempts} times; the "
                      "destination keeps its previous version", size=listed.st_size)

    def _put(self, fd: int, st: os.stat_result, rel: bytes, e: list[Any]) -> bool:
        """Stream the file; False if it changed meanwhile (the agent discards it)."""
        self._send({"op": "put", "path": rel, "e": e})
        h = blake3.blake3(max_threads=1)
        buf = self.buffers.get(0)
        size = st.st_size
        extents = data_extents(fd, size) if is_sparse(st) else ([(0, size)] if size else [])
        pos = 0
        try:
            for off, length in extents:
                if off > pos:
                    self._hole(h, off - pos)
                o, end = off, off + length
                while o < end:
                    want = min(len(buf), end - o)
                    n = read_source(fd, buf[:want], o)
                    if n < want:
                        self._send({"abort": "changed"})
                        return False
                    chunk = buf[:n]
                    if is_zero(chunk):
                        self._hole(h, n)
                    else:
                        h.update(chunk)
                        self._send({"d": chunk})
                    o += n
                pos = end
        except (SourceReadError, OSError):
            self._send({"abort": "unreadable"})
            raise
        if size > pos:
            self._hole(h, size - pos)
        if changed_since(st, os.fstat(fd)):
            self._send({"abort": "changed"})
            return False
        self._send({"end": h.digest()})
        return True

    def _hole(self, h: blake3.blake3, n: int) -> None:
        hash_zeros(h, n)
        self._send({"z": n})

    def _delta(self, fd: int, st: os.stat_result, rel: bytes, e: list[Any]) -> bool:
        """Let the agent fetch what its old version lacks; False if the file changed while read.
        The file is read once the agent asks, while the agent reads its old version."""
        changed = False

        def load() -> memoryview | None:
            nonlocal changed
            data = bytearray(st.st_size)
            if pread_full(fd, memoryview(data), 0) != st.st_size or changed_since(st, os.fstat(fd)):
                changed = True
                return None
            return memoryview(data)

        self._send({"op": "delta", "path": rel, "e": e})
        try:
            serve(self.chan, None, load)
        except (BrokenPipeError, ConnectionError) as exc:
            raise _Lost from exc
        return not changed
