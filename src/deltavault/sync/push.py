"""Push sync: mirror a local SRC into a directory on another host. The sender runs here
(sender/sender.py); ssh runs ``deltavault sync-agent`` there (receiver/agent.py), which
writes DST."""

from __future__ import annotations

from deltavault.progress import Reporter
from deltavault.sync.options import SyncOptions
from deltavault.sync.report import SyncLog, SyncResult
from deltavault.sync.sender.sender import Sender
from deltavault.sync.ssh import DEFAULT_REMOTE, RemotePath, SshProcess


class PushSyncer:
    def __init__(self, src: str | bytes, where: RemotePath, options: SyncOptions,
                 reporter: Reporter | None = None, log: SyncLog | None = None, *,
                 rsh: str = "ssh", remote: str = DEFAULT_REMOTE) -> None:
        self.where, self.rsh, self.remote = where, rsh, remote
        self.sender = Sender(src, where.path, str(where), options, reporter, log)

    def partial(self) -> SyncResult:
        return self.sender.partial()

    def run(self) -> SyncResult:
        return self.sender.run(lambda: SshProcess(self.where, f"{self.remote} sync-agent", rsh=self.rsh))
