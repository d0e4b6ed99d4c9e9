"""The sending side of a sync with another host: it walks SRC (sender/walk.py) and reads
files, while the agent (receiver/agent.py) compares, writes and deletes; the protocol is in
sync/wire.py. In a push this runs here and reaches the agent through ssh (sync/push.py);
in a pull it runs on the source host as ``deltavault sync-source``, with the agent at the
other end of its stdin and stdout (sync/pull.py). A changed file that the destination
already has in an older version travels by remote delta (RDC-style recursive signatures,
sync/remote.py): only the chunks the old version lacks cross the network.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from deltavault.errors import NoSpace, SourceError, TargetError, UsageError
from deltavault.fs.ntfs import NtfsView, probe
from deltavault.fs.paths import display
from deltavault.progress import NullReporter, Reporter
from deltavault.sync.data import (
    BufferPool,
)
from deltavault.sync.filters import Filter
from deltavault.sync.guard import Guard
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.options import SyncOptions
from deltavault.sync.report import Outcomes, SyncLog, SyncResult, SyncStats
from deltavault.sync.sender.files import FileSender
from deltavault.sync.sender.link import AgentLink, Lost, Stop
from deltavault.sync.sender.ntfs import NtfsSource, SenderNtfs
from deltavault.sync.sender.source import SourceTree
from deltavault.sync.sender.walk import End, Listing, SourceWalk
from deltavault.sync.tree import join
from deltavault.sync.wire import (
    FEATURES,
    VERSION,
    Channel,
    Duplex,
    entry,
    fatal_error,
    options_wire,
)

BATCH_DIRS = 64  # directories listed per round trip
BATCH_ENTRIES = 4096
# Listings hold their directory open until its files are sent (three batches are in
# flight); a batch ends once this many hold one, so that with the walk's own MAX_OPEN_DIRS
# the sender stays under a 256-file limit at any depth.
BATCH_FDS = 32


class Transport(Protocol):
    """How the agent is reached: ssh (SshProcess), or this process's stdin and stdout when
    the agent started us (a pull)."""

    channel: Channel

    def failure(self, what: str) -> Exception: ...

    def close(self) -> None: ...


class Sender:
    """Sends SRC to the agent a transport reaches. ``dest``: DST's path as the agent is to
    open it; ``peer``: how messages name the other end (may be empty)."""

    def __init__(self, src: str | bytes, dest: str, peer: str, options: SyncOptions,
                 reporter: Reporter | None = None, log: SyncLog | None = None) -> None:
        self.src = os.fsencode(src)
        self.dest, self.peer = dest, peer
        self.opts = options
        self.out = Outcomes(reporter or NullReporter(), log, stop_on_error=options.stop_on_error)
        self.filter = Filter(options.excludes, options.includes, default_excludes=options.default_excludes)
        self.meta = MetaPolicy(options)
        self.source = SourceTree(self.filter, self.meta, self.out, where="there")
        self.buffers = BufferPool(max(4096, options.bufsize))
        self.sent = self.received = 0  # bytes on the wire, both ways
        self.ntfs: SenderNtfs | None = None  # SRC on ntfs-3g, with --acl or --streams
        self.warnings: list[str] = []  # said once, at the end of the run

    @property
    def stats(self) -> SyncStats:
        return self.out.stats

    def partial(self) -> SyncResult:
        return SyncResult(self.out.stats, self.out.problems, self.out.stopped, wire=(self.sent, self.received),
                          warnings=self.warnings)

    def run(self, connect: Callable[[], Transport]) -> SyncResult:
        """Open SRC, then reach the agent (``connect``) and send."""
        try:
            root = os.open(self.src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot open the source {display(self.src)}: {exc.strerror or exc}") from exc
        try:
            # (FEATURES without "ntfs": this side reads no NTFS metadata, as an older one; tests use that)
            view = probe(root) if (self.opts.acl or self.opts.streams) and "ntfs" in FEATURES else None
            proc = connect()
        except BaseException:
            os.close(root)
            raise
        chan = Duplex(proc.channel)
        self.link = AgentLink(chan, self.out)
        self.files = FileSender(self.link, self.source, self.opts, self.buffers)
        self.out.reporter.start("sync")
        try:
            self._hello(root, view)
            self.files.ntfs = self.ntfs
            tree = SourceWalk(self.source, self.out, self.ntfs).walk(root, not self.filter.has_includes)
            try:
                self._walk(tree)
            except Stop:
                pass
            finally:
                tree.close()  # closes the directories it still holds
            self._finish()
        except Lost:
            raise proc.failure("closed the connection") from None
        finally:
            os.close(root)
            self.sent, self.received = chan.sent, chan.received
            proc.close()
            self.out.reporter.finish()
        if self.link.fatal is not None:
            raise fatal_error(self.link.fatal, self.peer)
        return self.partial()

    def _named(self, message: str) -> str:
        return f"{self.peer}: {message}" if self.peer else message

    def _hello(self, root: int, view: NtfsView | None) -> None:
        """Options, and SRC's identity: an agent on this same kernel refuses a DST that
        overlaps it, and tells us DST's, so that the walk leaves alone a mount showing it.
        From an ntfs-3g SRC (--acl, --streams), an agent that speaks "ntfs" says how DST
        shows streams; one that does not (an older deltavault) gets the data and POSIX
        metadata only: one warning, and each entry's log line names what it did not get."""
        options = {**options_wire(self.opts), "bufsize": self.buffers.size}
        source = {**Guard.one_side(root, is_src=True).describe(is_src=True), "path": self.src}
        self.link.send({"op": "hello", "version": VERSION, "dest": self.dest, "options": options, "source": source,
                        "root": entry(b"_", "d", os.fstat(root)), "features": FEATURES, "ntfs": view is not None})
        rep = self.link.reply(0)
        if "error" in rep:
            code = rep.get("code")
            raise (UsageError if code == 2 else NoSpace if code == 14 else TargetError)(self._named(rep["error"]))
        if rep.get("version") != VERSION:
            raise UsageError(self._named(f"the agent speaks sync protocol version {rep.get('version')}, this "
                                         f"sender version {VERSION}; install the same deltavault on both hosts"))
        self.source.guard = Guard.one_side(root, is_src=True, peer=rep.get("dest"))
        if view is not None:
            peer = "ntfs" in (rep.get("features") or [])
            if not peer:
                self.warnings.append(self._named(
                    "the deltavault there is older and cannot take NTFS metadata or streams (--acl, --streams "
                    "from an ntfs-3g source): the data was copied without them" + (
                        ", but for streams of up to 64 KiB kept as user. xattrs (--xattrs)" if self.opts.streams
                        and self.opts.xattrs else "") + "; the log (--log) names, entry by entry, what was not "
                    "kept; upgrade it to keep them"))
            dest = rep.get("ntfs")
            streams = dest.get("streams") if isinstance(dest, dict) else None
            self.ntfs = SenderNtfs(NtfsSource(view, streams=self.opts.streams), acl=self.opts.acl,
                                   streams=self.opts.streams, dest_streams=streams if isinstance(streams, str) else None,
                                   peer=peer, xattrs=self.opts.xattrs)
            self.meta.stream_xattrs = self.ntfs.xattr_streams

    def _finish(self) -> None:
        # The problems found here go too: in a pull, the agent's side reports the run.
        rid = self.link.request({"op": "finish", "problems": [[p.path, p.kind, p.message] for p in self.out.problems],
                                 "stopped": self.out.stopped})
        self.out.merge(SyncStats(**self.link.reply(rid, stop=False)["stats"]), [], False)

    # ------------------------------------------------------------------ batches
    def _walk(self, tree: Iterator[Listing | End]) -> None:
        """Three batches in flight, each a stage ahead of the next: while the files of one
        are sent, the agent compares the digests asked of the next and lists the one after.
        So the agent always has work, and round trips cost no idle time."""
        listed = self._list_batch(tree)
        checked: deque[list[Listing | End]] = deque()
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
                    (ev.listing if isinstance(ev, End) else ev).close()

    def _list_batch(self, tree: Iterator[Listing | End]) -> list[Listing | End]:
        """Send the listings of up to BATCH_DIRS directories (or BATCH_ENTRIES entries, or
        BATCH_FDS directories held open for their files)."""
        batch: list[Listing | End] = []
        dirs = entries = fds = 0
        for ev in tree:
            if isinstance(ev, Listing):
                ev.rid = self.link.request({"op": "dir", "path": ev.rel, "entries": ev.entries,
                                        "protected": ev.protected, "included": ev.included})
                dirs += 1
                entries += len(ev.entries)
                fds += ev.fd >= 0
            batch.append(ev)
            if dirs >= BATCH_DIRS or entries >= BATCH_ENTRIES or fds >= BATCH_FDS:
                break
        return batch

    def _ask_checks(self, batch: list[Listing | End]) -> None:
        """Take the agent's wants for a listed batch; send digests of the files it asks about."""
        for ev in batch:
            if isinstance(ev, Listing):
                ev.want = [(n, how) for n, how in self.link.reply(ev.rid)["want"]]
                checks = [n for n, how in ev.want if how == "check"]
                ev.rid = 0
                if checks:
                    items = [got for got in (self.files.digest(ev.fd, n, join(ev.rel, n), ev.files.get(n)) for n in checks)
                             if got is not None]
                    ev.rid = self.link.request({"op": "check", "path": ev.rel, "items": items})

    def _send_batch(self, batch: list[Listing | End]) -> None:
        try:
            for ev in batch:
                if isinstance(ev, Listing):
                    if ev.rid:
                        ev.want = [w for w in ev.want if w[1] != "check"] + [
                            (n, how) for n, how in self.link.reply(ev.rid)["want"]]
                    self._send_files(ev)
                    ev.close()  # its files are sent
                else:
                    self._end(ev.listing)
        finally:
            for ev in batch:
                (ev.listing if isinstance(ev, End) else ev).close()

    def _send_files(self, d: Listing) -> None:
        sent = {n for n, _ in d.want}
        self.out.reporter.advance(items=sum(1 for n in d.files if n not in sent))
        for name, how in d.want:
            self.files.send(d.fd, d.rel, name, d.files[name], how)
            if self.out.stopped:
                raise Stop

    def _end(self, d: Listing) -> None:
        self.link.send({"op": "enddir", "path": d.rel,
                        "e": entry(d.rel.rpartition(b"/")[2] or b"_", "d", d.st, xattrs=d.xattrs, win=d.win)})
        if self.ntfs is not None:
            self.ntfs.end_dir(d.rel, self.out)

    # ------------------------------------------------------------------ files
