"""The lock refresher renames the lock file (a new one written, then the old one deleted) on
its own thread, while the run checks the lock (``still_held``, before a snapshot is saved)
or releases it. Each order is forced here by a backend that holds one call until another
has happened, so no test depends on timing."""

from __future__ import annotations

import threading

from deltavault.backends.base import Backend, Forwarding, ObjectInfo
from deltavault.repository.locks import LockManager
from deltavault.repository.repository import Repository


class HeldWrite(Forwarding):
    """Holds the next write of a lock file until ``go`` is set."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.armed = False
        self.writing = threading.Event()
        self.go = threading.Event()

    def put(self, name: str, data: bytes) -> None:
        if self.armed and name.startswith("locks/"):
            self.armed = False
            self.writing.set()
            self.go.wait()
        self.inner.put(name, data)


class HeldCheck(Forwarding):
    """Holds a stat made by thread ``checker`` until a lock file has been deleted."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.checker: int | None = None
        self.checking = threading.Event()
        self.deleted = threading.Event()

    def stat(self, name: str) -> ObjectInfo:
        if threading.get_ident() == self.checker:
            self.checking.set()
            self.deleted.wait()
        return self.inner.stat(name)

    def delete(self, name: str) -> None:
        self.inner.delete(name)
        if name.startswith("locks/"):
            self.deleted.set()


def test_release_while_a_refresh_writes_leaves_no_lock_behind(repo: Repository) -> None:
    backend = HeldWrite(repo.backend)
    mgr = LockManager(backend, repo.env)
    lk = mgr.acquire(exclusive=False, command="backup")
    backend.armed = True
    refresher = threading.Thread(target=lk.refresh)
    refresher.start()
    backend.writing.wait()  # the refresh is writing the lock's new file
    lk.release()  # the run ends meanwhile
    backend.go.set()
    refresher.join()
    assert mgr.list_locks() == []  # before: the new file stayed, blocking prune for 15 minutes


def test_a_check_during_a_refresh_does_not_think_the_lock_lost(repo: Repository) -> None:
    backend = HeldCheck(repo.backend)
    mgr = LockManager(backend, repo.env)
    lk = mgr.acquire(exclusive=False, command="backup")
    held: list[bool] = []

    def check() -> None:
        backend.checker = threading.get_ident()
        held.append(lk.still_held())

    checker = threading.Thread(target=check)
    checker.start()
    # The checker has the old name and waits; the refresh renames the file meanwhile.
    backend.checking.wait()
    lk.refresh()
    checker.join()
    assert held == [True] and not lk.lost  # before: lost, and the backup's snapshot refused
    lk.release()
    assert mgr.list_locks() == []
