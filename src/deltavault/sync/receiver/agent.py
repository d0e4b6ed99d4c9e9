"""The agent: the receiving side at the far end of ssh. Run as ``deltavault sync-agent`` for
a push, or here, started by a pull (sync/pull.py), it answers the sender's requests (the
protocol is in sync/wire.py; the answers in receiver/requests.py) and writes DST with the
shared receiver (receiver/core.py), as the local engine does.

"hello" carries the options and the sender's SRC identity: on the same kernel (ssh to
localhost), a DST that is SRC, lies in it or contains it is refused (sync/guard.py). It
carries SRC's root too (protocol version 2): DST's root is taken for the run, if others
own or reach it, before the first listing comes (receiver/root.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from deltavault.errors import CorruptionError, DeltavaultError
from deltavault.fs.ntfs import probe
from deltavault.progress import NullReporter, Reporter
from deltavault.sync.data import BufferPool
from deltavault.sync.filters import Filter
from deltavault.sync.guard import Guard
from deltavault.sync.meta import MetaPolicy
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.core import Receiver
from deltavault.sync.receiver.dirs import OpenDirs
from deltavault.sync.receiver.ntfs import AgentNtfs, NtfsDest
from deltavault.sync.receiver.records import AgentOutcomes
from deltavault.sync.receiver.requests import Requests
from deltavault.sync.receiver.root import open_root
from deltavault.sync.report import SyncLog, SyncProblem, SyncStats
from deltavault.sync.wire import FEATURES, VERSION, Entry, Frames, Paths, options_from


class Agent:
    """``dest``, ``log`` and ``reporter``: in a pull the agent runs here, on DST's host, and
    reports the run itself (it then ignores the destination the sender names)."""

    def __init__(self, chan: Frames, *, dest: bytes | None = None, log: SyncLog | None = None,
                 reporter: Reporter | None = None) -> None:
        self.chan = chan
        self.dest = dest
        self.out = AgentOutcomes(reporter or NullReporter(), log)
        self.sender_problems: list[SyncProblem] = []
        self.sender_stopped = False
        self.finished = False
        self.refused: DeltavaultError | None = None  # why the run could not start here
        self.warnings: list[str] = []  # for a pull's report
        self.root = -1
        self.rx: Receiver | None = None
        self.requests: Requests | None = None

    @property
    def stats(self) -> SyncStats:
        return self.out.stats

    @property
    def problems(self) -> list[SyncProblem]:
        return self.out.problems

    @property
    def fatal(self) -> str | None:
        return self.out.fatal

    def run(self) -> None:
        try:
            if not self._hello():
                return
            assert self.requests is not None
            answers = {"dir": self.requests.dir, "check": self.requests.check}
            actions = {"put": self.requests.put, "delta": self.requests.delta, "enddir": self.requests.enddir}
            while True:
                req = self.chan.recv()
                op = req.get("op") if isinstance(req, dict) else None
                if op == "finish":
                    self._finish(req)
                    return
                if op in answers:
                    self._reply(req, want=answers[op](req))
                elif op in actions:
                    actions[op](req)
                else:
                    raise CorruptionError(f"the sender sent an unknown request {op!r}")
        except EOFError:
            return  # the sender is gone; every file it finished is in place, no temp file is left
        finally:
            if self.requests is not None:
                self.requests.dirs.close()
            if self.root >= 0:
                if self.rx is not None:
                    self.rx.temps.remove_all(self.root)
                    self.rx.release_root()  # (a run cut short: the root is not left taken)
                os.close(self.root)

    def _hello(self) -> bool:
        req = self.chan.recv()
        if not isinstance(req, dict) or req.get("op") != "hello" or req.get("version") != VERSION:
            theirs = req.get("version") if isinstance(req, dict) else None
            self.chan.send({"error": f"this agent speaks sync protocol version {VERSION}, the sender "
                            f"version {theirs}; install the same deltavault on both hosts", "code": 2, "id": 0})
            return False
        try:
            opts = options_from(req["options"])
            self.rx = rx = Receiver(opts, MetaPolicy(opts), self.out, BufferPool(opts.bufsize),
                                    Filter(opts.excludes, opts.includes, default_excludes=opts.default_excludes),
                                    unmarked_groups=True)  # (a sender older than group marks)
            dest = self.dest or os.fsencode(req["dest"])
            self._open_root(rx, dest, req.get("source"))
            rx.take_root(Entry(req.get("root")).st, dest)  # SRC's root, as the sender saw it at the start
        except DeltavaultError as exc:
            self.refused = exc
            self.chan.send({"error": exc.message, "code": int(exc.exit_code), "id": 0})
            return False
        self.requests = Requests(self.chan, rx, self.out, OpenDirs(self.root), Paths())
        assert rx.guard is not None
        ntfs = None
        if req.get("ntfs") is True and "ntfs" in (req.get("features") or []):
            ntfs = self._ntfs(rx, opts)
        elif (opts.acl or opts.streams) and "ntfs" not in (req.get("features") or []):
            # An older sender reads no NTFS metadata: which entries had any cannot be known here.
            self.warnings.append("the deltavault there is older and reads no NTFS metadata or streams: if SRC "
                                 "is on ntfs-3g, its descriptors, DOS attributes, creation times and named "
                                 "streams were not copied (which entries had them cannot be told from here); "
                                 "upgrade it to keep them")
        self.chan.send({"ok": True, "version": VERSION, "id": 0, "dest": rx.guard.describe(is_src=False),
                        "features": FEATURES, "ntfs": ntfs})
        return True

    def _ntfs(self, rx: Receiver, opts: SyncOptions) -> dict[str, Any] | None:
        """SRC is on ntfs-3g (--acl, --streams): DST's view of NTFS, for the sender."""
        dest = NtfsDest(probe(self.root))
        rx.ntfs = AgentNtfs(dest, acl=opts.acl, streams=opts.streams, delta=opts.delta, delta_min=opts.delta_min,
                            verify=opts.verify, bufsize=opts.bufsize)
        rx.meta.stream_xattrs = rx.ntfs.xattr_streams
        return {"streams": dest.view.streams} if dest.view is not None else None

    def _open_root(self, rx: Receiver, dest: bytes, source: Any) -> None:
        """Open (or make) DST, refused if the sender's SRC is on this kernel and overlaps it."""
        src_name = os.fsencode(source["path"]) if isinstance(source, dict) and isinstance(
            source.get("path"), bytes | str) else b"the source"
        self.root = open_root(dest, Guard.peer_root(source), src_name)
        rx.root = self.root
        rx.guard = Guard.one_side(self.root, is_src=False, peer=source)
        rx.guard.check(src_name, dest)

    def _reply(self, req: dict[str, Any], **kw: Any) -> None:
        self.chan.send({**kw, "id": req.get("id"), "records": self.out.records, "fatal": self.out.fatal})
        self.out.records = []

    def _finish(self, req: dict[str, Any]) -> None:
        log = self.out.log
        for path, kind, message in req.get("problems") or []:  # the sender's, for a pull's report
            if log is not None:
                log.write("error", 0, path.encode("utf-8", "surrogateescape"), error=f"{kind}: {message}")
        self.sender_problems = [SyncProblem(path, kind, message) for path, kind, message in req.get("problems") or []]
        self.sender_stopped = bool(req.get("stopped"))
        self.finished = True
        if self.out.fatal is None and self.requests is not None:
            self.requests.finish()
        self._reply(req, stats=asdict(self.out.stats))
