"""Pull sync: mirror a directory on another host into a local DST. ssh runs
``deltavault sync-source`` there (``send_source``), which walks SRC (optionally from a
snapshot it takes) and sends, as in a push (sender/sender.py); the agent runs here
(receiver/agent.py), writes DST and reports the run."""

from __future__ import annotations

import os
from typing import Any

from deltavault.errors import TargetError, UsageError
from deltavault.progress import NullReporter, Reporter
from deltavault.snapshot import take_snapshot
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.agent import Agent
from deltavault.sync.report import SyncLog, SyncResult, SyncStats
from deltavault.sync.sender.sender import Sender
from deltavault.sync.ssh import DEFAULT_REMOTE, RemotePath, SshProcess
from deltavault.sync.wire import VERSION, Channel, fatal_error, options_from, options_wire


class PullSyncer:
    def __init__(self, where: RemotePath, dst: str | bytes, options: SyncOptions,
                 reporter: Reporter | None = None, log: SyncLog | None = None, *,
                 rsh: str = "ssh", remote: str = DEFAULT_REMOTE, snapshot: str = "none") -> None:
        self.where, self.dst, self.opts = where, os.fsencode(dst), options
        self.reporter = reporter or NullReporter()
        self.log, self.rsh, self.remote, self.snapshot = log, rsh, remote, snapshot
        self.agent: Agent | None = None
        self.wire = (0, 0)

    def partial(self) -> SyncResult:
        a = self.agent
        if a is None:
            return SyncResult(SyncStats(), wire=self.wire)
        return SyncResult(a.stats, a.problems + a.sender_problems, a.sender_stopped, wire=self.wire,
                          warnings=a.warnings)

    def run(self) -> SyncResult:
        proc = SshProcess(self.where, f"{self.remote} sync-source", rsh=self.rsh)
        self.agent = agent = Agent(proc.channel, dest=self.dst, log=self.log, reporter=self.reporter)
        self.reporter.start("sync")
        try:
            try:
                proc.channel.send({"op": "source", "version": VERSION, "path": self.where.path,
                                   "options": options_wire(self.opts), "snapshot": self.snapshot})
            except (BrokenPipeError, ConnectionError):
                raise proc.failure("closed the connection") from None
            agent.run()
            if agent.refused is not None:
                raise agent.refused
            if not agent.finished:
                raise proc.failure("ended before the run did")
        finally:
            self.wire = (proc.channel.sent, proc.channel.received)
            proc.close()
            self.reporter.finish()
        if agent.fatal is not None:
            raise fatal_error(agent.fatal)
        return self.partial()


class Stdio:
    """The transport of ``deltavault sync-source``: the agent that started it over ssh is at
    the other end of stdin and stdout."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def failure(self, what: str) -> Exception:
        return TargetError(f"the receiving side {what}")

    def close(self) -> None:
        pass


def source_request(chan: Channel) -> dict[str, Any]:
    """The first frame a pull sends: what to send, and how."""
    req = chan.recv()
    if not isinstance(req, dict) or req.get("op") != "source" or req.get("version") != VERSION:
        theirs = req.get("version") if isinstance(req, dict) else None
        raise UsageError(f"this deltavault speaks sync protocol version {VERSION}, the other end version "
                         f"{theirs}; install the same deltavault on both hosts")
    return req


def send_source(chan: Channel) -> None:
    """``deltavault sync-source``: send what the pull at the other end of ``chan`` asks for,
    from a snapshot of it if asked."""
    req = source_request(chan)
    with take_snapshot(req["path"], req.get("snapshot") or "none") as snap:
        Sender(snap.source_path, "", "", options_from(req["options"])).run(lambda: Stdio(chan))
