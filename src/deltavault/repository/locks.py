"""Repository locks: shared for backup/restore/check, exclusive for prune and repair.

A lock is a small sealed object under ``locks/``. Holders refresh it in the background
(rewritten under a new name, then the old one deleted). A lock is stale when its refresh is
older than STALE_AFTER, or at once when it names a process of this very boot of this host
that no longer exists (or is a zombie). Stale locks are removed, live conflicting ones
waited for. A holder whose lock was removed as stale notices (``lost``) and must not
commit anything that relies on it.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable

import msgspec

from deltavault.backends.base import Backend
from deltavault.errors import (
    AccessRefused,
    BackendError,
    CorruptionError,
    ObjectNotFound,
    RepositoryLocked,
)
from deltavault.framing import decode_json
from deltavault.fs.paths import shown
from deltavault.platform import proc_start, process_alive
from deltavault.repository.envelope import Envelope

LOCK_AAD = b"lock"
REFRESH_EVERY = 120.0
STALE_AFTER = 15 * 60.0


class LockInfo(msgspec.Struct, kw_only=True):
    hostname: str
    pid: int
    pid_start: int  # process start time in clock ticks (guards against pid reuse)
    exclusive: bool
    created: float
    refreshed: float
    command: str = ""
    # Kernel boot id: a pid is only meaningful within one boot, and two machines that share
    # a host name (containers) never share it.
    boot_id: str = ""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class LockManager:
    def __init__(self, backend: Backend, env: Envelope, *, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.env = env
        self.clock = clock
        self.hostname = socket.gethostname()
        self.boot_id = _boot_id()

    def _read(self, name: str) -> LockInfo | None:
        try:
            raw = self.env.open(self.backend.get(name), aad=LOCK_AAD, what=name)
            return decode_json(raw, LockInfo)
        except ObjectNotFound:
            return None
        except CorruptionError:
            # Unreadable lock: treat as stale only once it is old by file listing age.
            return LockInfo(hostname="?", pid=0, pid_start=0, exclusive=True, created=0.0, refreshed=0.0)

    def is_stale(self, info: LockInfo) -> bool:
        if self.clock() - info.refreshed > STALE_AFTER:
            return True
        if info.hostname != self.hostname:
            return False  # another host: only its refresh time tells
        if info.boot_id and self.boot_id and info.boot_id != self.boot_id:
            # Same name, other boot: either this host rebooted (the holder is gone) or it
            # is another machine with the same name; only time can tell those apart.
            return False
        return not process_alive(info.pid, info.pid_start)

    def _write(self, info: LockInfo) -> str:
        name = f"locks/{os.urandom(16).hex()}"
        try:
            self.backend.put(name, self.env.seal(msgspec.json.encode(info), aad=LOCK_AAD))
        except AccessRefused as exc:
            exc.lock_record = True
            raise
        return name

    def list_locks(self) -> list[tuple[str, LockInfo]]:
        out = []
        for obj in self.backend.list("locks/"):
            info = self._read(obj.name)
            if info is not None:
                out.append((obj.name, info))
        return out

    def acquire(self, *, exclusive: bool, command: str = "", wait: float = 0.0) -> Lock:
        deadline = time.monotonic() + wait
        delay = 0.2
        while True:
            now = self.clock()
            info = LockInfo(hostname=self.hostname, pid=os.getpid(), pid_start=proc_start(os.getpid()),
                            exclusive=exclusive, created=now, refreshed=now, command=command,
                            boot_id=self.boot_id)
            name = self._write(info)
            blocker: LockInfo | None = None
            for other_name, other in self.list_locks():
                if other_name == name:
                    continue
                if self.is_stale(other):
                    self.backend.delete(other_name)
                    continue
                if exclusive or other.exclusive:
                    blocker = other
                    break
            if blocker is None:
                return Lock(self, name, info)
            self.backend.delete(name)
            if time.monotonic() >= deadline:
                kind = "exclusively" if blocker.exclusive else "shared"
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(blocker.created))
                raise RepositoryLocked(
                    f"repository is locked {kind} by pid {blocker.pid} on {shown(blocker.hostname)} "
                    f"({shown(blocker.command) or 'unknown command'}) since {since}; "
                    f"retry later, or use --lock-wait SECONDS")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)


class Lock:
    def __init__(self, mgr: LockManager, name: str, info: LockInfo) -> None:
        self.mgr = mgr
        self.name = name
        self.info = info
        self.lost = False  # our lock file was removed by someone who judged it stale
        self.released = False
        # The refresher renames the lock file while the run checks it or releases it: _mutex
        # orders the name's changes with release, never held over a backend call.
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresher, name="lock-refresh", daemon=True)
        self._thread.start()

    def _refresher(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                self.refresh()
            except BackendError:
                pass  # retried on the next tick; stale only after STALE_AFTER

    def refresh(self) -> None:
        if self.lost or not self.still_held():
            return
        self.info.refreshed = self.mgr.clock()
        new = self.mgr._write(self.info)
        with self._mutex:
            old, self.name = self.name, new
            released = self.released
        # A release that came while the new file was written deleted the old one only
        # (tests/unit/test_locks_threads.py): the new one is this refresh's to delete.
        try:
            self.mgr.backend.delete(old)
        except ObjectNotFound:
            pass
        finally:
            if released:
                self.mgr.backend.delete(new)

    def still_held(self) -> bool:
        """False once our lock file is gone: a peer removed it as stale, so an exclusive
        holder may have run since. Not re-created: work under it is no longer safe."""
        while not self.lost:
            name = self.name
            try:
                self.mgr.backend.stat(name)
                return True
            except ObjectNotFound:
                if self.name != name:
                    continue  # renamed by a refresh meanwhile, the old file deleted: ask again
                self.lost = True
            except BackendError:
                return True  # cannot tell; the next refresh or check asks again
        return False

    def release(self) -> None:
        with self._mutex:
            if self.released:
                return
            self.released = True
            name = self.name
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.mgr.backend.delete(name)
        except BackendError:
            pass

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
